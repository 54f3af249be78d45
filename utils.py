"""What the four scripts share, under one name: `utils.X` is how scripts, tests and benchmarks reach it.

Each job lives in its own module of `reasonforge/`, and this file only re-exports their public names:
- reasonforge/core.py: errors, one-line messages, atomic JSON files, the path rule, number checks
- reasonforge/cli.py: the main() wrapper (exit codes, SIGTERM, one-line errors) and logging
- reasonforge/rundirs.py: output folders: the run lock, checks before writing, atomic swaps
- reasonforge/chat_format.py: Qwen chat templates, rendering, the training mask, prepared datasets
- reasonforge/s3.py: S3 URIs, the client, the one error translator, folder and JSON sync
- reasonforge/models.py: backend choice, model and adapter loading, GPU memory, the demo model
- reasonforge/generation.py: generation settings and flags, loading for inference, batched replies

Importing it loads nothing heavy (torch, transformers, datasets, boto3, unsloth are imported inside
the functions that need them), so `--help` stays instant and a CPU machine never imports unsloth.
A test that replaces a function must patch the module that calls it: the modules call each other
directly, not through this file.
"""

from reasonforge.chat_format import (
    BUILTIN_TEMPLATES,
    QWEN3_TEMPLATE,
    QWEN25_TEMPLATE,
    ROLES,
    TEMPLATE_CHOICES,
    clean_messages,
    encode_conversation,
    encode_rows,
    keeps_row,
    map_fingerprint,
    load_prepared_dataset,
    render_chat,
    resolve_chat_template,
    template_family,
    template_misfit,
    tokenize_for_training,
    training_turns,
)
from reasonforge.cli import cli_entry, describe_environment_error, not_utf8, setup_logging
from reasonforge.core import (
    MAX_SEQ_LENGTH,
    SEED_MAX,
    CorruptFile,
    Terminated,
    UserError,
    absolute_if_local,
    atomic_write_json,
    first_line,
    frozen,
    holds_json,
    library_versions,
    number_problems,
    parse_key_value_list,
    path_kind,
    read_json,
    redact_secrets,
    sig4,
    to_json,
    utc_stamp,
)
from reasonforge.generation import (
    RECORDED_DEFAULTS,
    GenerationSettings,
    add_generation_flags,
    add_inference_model_flags,
    context_length,
    engine_for,
    resolve_engine,
    fit_to_context,
    planned_batch_size,
    generate_batch,
    generation_settings_from_args,
    inference_flag_problems,
    load_for_inference,
    prepare_for_inference,
    reply_tokens,
    stop_token_ids,
)
from reasonforge.demo_model import DEMO_MODEL_PACKAGE, export_demo_model
from reasonforge.gpu_memory import format_memory_stats, gpu_memory_stats
from reasonforge.models import (
    RUN_INFO_FILE,
    check_model_path,
    choose_backend,
    hub_model_problem,
    import_unsloth_first,
    load_model,
    read_adapter_info,
    resolve_model_for_inference,
)
from reasonforge.rundirs import RunLock, atomic_directory, output_dir_problem, process_start_time, report_file_problem
from reasonforge.s3 import (
    S3_MAX_ATTEMPTS,
    S3Uri,
    check_s3_bucket,
    download_file,
    download_prefix,
    fetch_if_s3,
    list_s3_objects,
    list_s3_subfolders,
    parse_s3_uri,
    s3_client,
    s3_etag_of_file,
    s3_get_json,
    s3_key_problem,
    s3_put_json,
    safe_local_path,
    upload_directory,
    upload_file,
    validate_bucket_name,
)
