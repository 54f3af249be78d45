"""S3: URIs, the client, the one error translator every call goes through, and folder and JSON sync."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from reasonforge.progress import bar as progress_bar
from reasonforge.core import CorruptFile, UserError, describe_os_error, first_line, log, path_kind, to_json


MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def join(self, *parts: str) -> "S3Uri":
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/")))


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def validate_bucket_name(bucket: str) -> str:
    if not _BUCKET_RE.match(bucket or "") or ".." in bucket:
        raise UserError(
            f"invalid S3 bucket name {bucket!r}: use 3-63 lowercase letters, digits, '-' or '.', "
            "starting and ending with a letter or digit"
        )
    return bucket


def parse_s3_uri(uri: str) -> S3Uri:
    if path_kind(uri) != "s3":
        raise UserError(f"{uri!r} is not an S3 URI; write it as s3://BUCKET/PREFIX")
    bucket, _, prefix = uri[5:].partition("/")
    validate_bucket_name(bucket)
    prefix = prefix.strip("/")
    if any(part in ("..", ".") for part in prefix.split("/")):
        raise UserError(f"S3 prefix in {uri!r} contains '.' or '..' parts; use a plain path")
    problem = s3_key_problem(prefix, f"the S3 prefix in {uri!r}", allow_empty=True)
    if problem:
        raise UserError(problem)
    return S3Uri(bucket, prefix)


def s3_key_problem(value: str, flag: str, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be (part of) an S3 key exactly as printed, or None.

    S3 keeps '..', empty parts and control characters literally, so a key holding them is not
    the path a user reads in the printed URI (and breaks `aws s3 sync` back to disk).
    """
    parts = value.strip("/").split("/")
    if not value.strip("/"):
        return None if allow_empty else f"{flag} {value!r} is empty; give a path like runs/my-run"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"{flag} {value!r} holds control characters (tab, newline, ...); use letters, digits, '-', '_', '.' and '/'"
    if any(p in ("", ".", "..") for p in parts):
        return f"{flag} {value!r} has an empty, '.' or '..' part; write a plain path like runs/my-run"
    if "\\" in value:
        return f"{flag} {value!r} holds a backslash; S3 keys use '/' between parts"
    if len(value.encode()) > 900:
        return f"{flag} is {len(value.encode())} bytes long; S3 keys end at 1024 bytes, keep it under 900"
    return None


# Every S3 call waits at most this long to connect and for each answer, over this many attempts:
# an endpoint that accepts connections but never answers fails in under a minute, where botocore's
# defaults (60 s over 5 attempts) keep the user waiting for minutes before saying anything.
S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S, S3_MAX_ATTEMPTS = 5, 15, 3


def s3_max_attempts() -> int:
    raw = os.environ.get("RF_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 10:
        raise UserError(f"RF_S3_MAX_ATTEMPTS={raw!r} must be a whole number from 1 to 10; unset it for {S3_MAX_ATTEMPTS}")
    return int(raw)


def s3_client():
    """A boto3 client with bounded waits and retries; AWS_ENDPOINT_URL (standard) picks the server.

    A broken setting (endpoint, profile, region, config file) fails here, as one UserError.
    """
    attempts = s3_max_attempts()
    with s3_errors(None, "setup"):  # botocore raises ValueError and its own kinds here
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_READ_TIMEOUT_S,
            s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else None,
        )
        return boto3.session.Session().client("s3", config=cfg)


def _explain_s3_setup(exc: Exception) -> UserError | None:
    """The settings that break every S3 call, whichever bucket: endpoint, profile, config files, region."""
    from botocore.exceptions import ConfigParseError, EndpointResolutionError, InvalidRegionError, ProfileNotFound

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if isinstance(exc, EndpointResolutionError) or (isinstance(exc, ValueError) and "endpoint" in str(exc).lower()):
        return UserError(f"AWS_ENDPOINT_URL={endpoint!r} is not a usable S3 endpoint ({first_line(exc, 120)}); "
                         "write it like http://127.0.0.1:8333 or https://s3.example.com, or unset it for AWS")
    if isinstance(exc, ProfileNotFound):
        profile = exc.kwargs.get("profile") or os.environ.get("AWS_PROFILE")
        return UserError(f"AWS profile {profile!r} (AWS_PROFILE) is not in ~/.aws/config or ~/.aws/credentials; "
                         "fix the name, add it with `aws configure --profile NAME`, or unset AWS_PROFILE")
    if isinstance(exc, ConfigParseError):
        return UserError(f"cannot parse the AWS config file {exc.kwargs.get('path')}: fix its syntax "
                         "([profile] headers, key = value lines) or point AWS_SHARED_CREDENTIALS_FILE / "
                         "AWS_CONFIG_FILE at a good one")
    if isinstance(exc, InvalidRegionError):
        return UserError(f"AWS region {exc.kwargs.get('region_name')!r} is not a region name; set AWS_DEFAULT_REGION "
                         "(or AWS_REGION, or region in ~/.aws/config) like us-east-1")
    return None


def explain_s3_error(exc: Exception, bucket: str | None, action: str) -> UserError:
    """Translate a boto3/botocore failure into one line naming the bucket and the fix.

    Every S3 call of the suite goes through here (by way of s3_errors), so no botocore traceback
    reaches a user.
    """
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError, ReadTimeoutError, SSLError)

    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, UserError):
        return exc
    # boto3's transfer manager wraps the botocore error it met; the wrapped one says what happened.
    inner = getattr(exc, "last_exception", None) or exc.__context__
    if isinstance(exc, (S3UploadFailedError, RetriesExceededError)) and isinstance(inner, Exception):
        return explain_s3_error(inner, bucket, action)
    setup = _explain_s3_setup(exc)
    if setup is not None:
        return setup
    where = f"s3://{bucket}" if bucket else "S3"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UserError(
            f"no AWS credentials for {where} ({action}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or attach an instance role"
        )
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return UserError(f"the S3 endpoint for {where} did not answer within {S3_READ_TIMEOUT_S} s "
                         f"({s3_max_attempts()} attempts, {action}): check AWS_ENDPOINT_URL / network and retry")
    if isinstance(exc, SSLError):
        return UserError(f"TLS with the S3 endpoint for {where} failed ({action}): check http:// vs https:// in "
                         "AWS_ENDPOINT_URL, or AWS_CA_BUNDLE for a private certificate")
    if isinstance(exc, EndpointConnectionError):
        return UserError(f"cannot reach the S3 endpoint for {where} ({action}): check AWS_ENDPOINT_URL / network and retry")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404") and action != "download":
            return UserError(f"bucket {bucket!r} does not exist ({action}): create it (aws s3 mb {where}) or fix --s3-bucket")
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket!r} does not exist: check the s3:// URI")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"):
            return UserError(
                f"S3 rejected the credentials for {where} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return UserError(f"access denied to {where} ({action}): grant this identity s3:ListBucket/GetObject/PutObject on the bucket")
        return UserError(f"S3 {action} on {where} failed: {code or exc}")
    from botocore.exceptions import BotoCoreError

    if isinstance(exc, BotoCoreError):
        return UserError(f"S3 {action} on {where} failed: {first_line(exc)}; check the endpoint and retry")
    if isinstance(exc, OSError) and describe_os_error(exc) is not None:
        return UserError(describe_os_error(exc))
    return UserError(f"S3 {action} on {where} failed: {first_line(exc)}")


@contextlib.contextmanager
def s3_errors(bucket: str | None, action: str) -> Iterator[None]:
    """Run S3 calls so that any failure leaves as one UserError (explain_s3_error's): every function
    here that talks to S3 does so inside this block."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # boto raises many types; each becomes one clear line
        raise explain_s3_error(exc, bucket, action) from exc


def check_s3_bucket(bucket: str, action: str) -> None:
    """Fail before the work, not after it, when the bucket cannot be used with these settings.

    A one-key listing, not HEAD: a HEAD error has no body, so a wrong secret would read as 403.
    """
    client = s3_client()
    with s3_errors(bucket, action):
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)


def s3_etag_of_file(path: Path, size: int) -> str:
    """The ETag S3 gives an object uploaded by `upload_directory`: MD5, or MD5-of-part-MD5s-N."""
    if size < MULTIPART_THRESHOLD:
        h = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    digests = []
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MULTIPART_CHUNKSIZE), b""):
            digests.append(hashlib.md5(block).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def list_s3_objects(client, uri: S3Uri) -> dict[str, dict]:
    """Map of key (relative to the prefix) -> {size, etag} for every object under `uri`."""
    out = {}
    prefix = uri.prefix + "/" if uri.prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel:
                out[rel] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
    return out


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE, max_concurrency=4,
                          num_download_attempts=s3_max_attempts())


def upload_file(path: str | Path, uri: S3Uri) -> None:
    """Upload one file to the key `uri`; failures come out as one clear line."""
    client = s3_client()
    with s3_errors(uri.bucket, "upload"):
        client.upload_file(str(path), uri.bucket, uri.prefix, Config=_transfer_config())


def download_file(uri: S3Uri, path: str | Path) -> None:
    """Download the object at the key `uri` to `path`; failures come out as one clear line."""
    client = s3_client()
    with s3_errors(uri.bucket, "download"):
        client.download_file(uri.bucket, uri.prefix, str(path), Config=_transfer_config())


def upload_directory(local_dir: str | Path, uri: S3Uri | str, desc: str = "upload", progress: bool = True,
                     exclude: set[str] = frozenset()) -> dict:
    """Mirror a local folder to s3://bucket/prefix/, skipping objects whose size and ETag match.

    Returns counts of uploaded and skipped files and bytes sent.
    """
    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in exclude)
    client = s3_client()
    with s3_errors(uri.bucket, "upload"):
        remote = list_s3_objects(client, uri)
        todo = []
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            size = path.stat().st_size
            have = remote.get(rel)
            if have and have["size"] == size and have["etag"] == s3_etag_of_file(path, size):
                continue
            todo.append((path, rel, size))
        total = sum(size for _, _, size in todo)
        with progress_bar(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress or not todo) as bar:
            for path, rel, _ in todo:
                client.upload_file(str(path), uri.bucket, uri.join(rel).prefix, Config=_transfer_config(), Callback=bar.update)
    return {"uploaded": len(todo), "skipped": len(files) - len(todo), "bytes": total}


def safe_local_path(root: Path, rel_key: str) -> Path:
    """Where an S3 key lands under `root`; keys that would escape it are refused."""
    if not rel_key or rel_key.startswith("/") or "\\" in rel_key or any(p in ("..", "") for p in rel_key.split("/")):
        raise UserError(f"refusing S3 key {rel_key!r}: it would write outside {root}")
    target = (root / rel_key).resolve()
    if root.resolve() not in target.parents:
        raise UserError(f"refusing S3 key {rel_key!r}: it would write outside {root}")
    return target


def download_prefix(uri: S3Uri | str, local_dir: str | Path, desc: str = "download", progress: bool = True) -> dict:
    """Fetch every object under s3://bucket/prefix/ into local_dir, skipping unchanged files."""
    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    local_dir = Path(local_dir)
    client = s3_client()
    with s3_errors(uri.bucket, "download"):
        remote = list_s3_objects(client, uri)
        if not remote:
            raise UserError(f"nothing found under {uri}: check the bucket and prefix (aws s3 ls {uri}/)")
        todo = []
        for rel, meta in sorted(remote.items()):
            target = safe_local_path(local_dir, rel)
            if target.is_file() and target.stat().st_size == meta["size"] and s3_etag_of_file(target, meta["size"]) == meta["etag"]:
                continue
            todo.append((rel, target, meta["size"]))
        with progress_bar(total=sum(t[2] for t in todo), unit="B", unit_scale=True, desc=desc, disable=not progress or not todo) as bar:
            for rel, target, _ in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                client.download_file(uri.bucket, uri.join(rel).prefix, str(tmp), Config=_transfer_config(), Callback=bar.update)
                os.replace(tmp, target)
    return {"downloaded": len(todo), "skipped": len(remote) - len(todo)}


def s3_put_json(uri: S3Uri, obj: Any) -> None:
    client = s3_client()
    with s3_errors(uri.bucket, "upload"):
        client.put_object(Bucket=uri.bucket, Key=uri.prefix, Body=to_json(obj, indent=2).encode())


def s3_get_json(uri: S3Uri) -> Any | None:
    """The JSON object at `uri`, or None where there is none."""
    from botocore.exceptions import ClientError

    client = s3_client()
    with s3_errors(uri.bucket, "download"):
        try:
            body = client.get_object(Bucket=uri.bucket, Key=uri.prefix)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise CorruptFile(f"{uri} is not valid JSON ({first_line(exc, 120)}); upload it again or delete it") from None
    return obj


def list_s3_subfolders(uri: S3Uri) -> list[str]:
    client = s3_client()
    prefix = uri.prefix + "/" if uri.prefix else ""
    names = []
    with s3_errors(uri.bucket, "list"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].strip("/") for p in page.get("CommonPrefixes", [])]
    return names


S3_CACHE = "./data_cache/s3"


def s3_cache_path(path: str, cache_root: str | Path = S3_CACHE) -> Path:
    """Where fetch_if_s3 mirrors an s3:// URI (whether or not it has been fetched yet)."""
    uri = parse_s3_uri(str(path))
    return Path(cache_root) / uri.bucket / uri.prefix


def fetch_if_s3(path: str, cache_root: str | Path = S3_CACHE) -> Path:
    """Local path for `path`; an s3:// URI is first mirrored into a cache folder."""
    if path_kind(path) != "s3":
        return Path(path)
    uri = parse_s3_uri(str(path))
    target = s3_cache_path(str(path), cache_root)
    log.info("downloading %s -> %s", uri, target)
    download_prefix(uri, target)
    return target
