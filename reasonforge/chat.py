"""test_model.py's chat and single instruction: replies streamed token by token, Ctrl-C stopping only
the reply, the settings dialog and the transcript written as the chat goes."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from reasonforge import chat_format, cli, core, generation
from reasonforge.core import UserError


def conversation(instruction: str, system_prompt: str | None, history: list[dict] | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + list(history or []) + [{"role": "user", "content": instruction}]


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


class ReplyInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; `result` holds what was written of the reply until then."""

    def __init__(self, result: dict):
        super().__init__()
        self.result = result


class ChatInterrupted(KeyboardInterrupt):
    """Ctrl-C at the prompt, which ends the chat; `turns`, `settings` and `transcript` (its path) are
    the chat's until then."""

    def __init__(self, turns: list[dict], settings, transcript: Path | None):
        super().__init__()
        self.turns, self.settings, self.transcript = turns, settings, transcript


def collecting_streamer(tokenizer):
    """A TextStreamer that also keeps the text and token count, so a stopped reply is not lost."""
    from transformers import TextStreamer

    class CollectingStreamer(TextStreamer):
        text, tokens = "", 0

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text += text
            super().on_finalized_text(text, stream_end)

    return CollectingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream_reply(model, tokenizer, messages: list[dict], settings: generation.GenerationSettings,
                 engine: str = "static") -> dict:
    """Generate one reply, printing tokens as they arrive; Ctrl-C raises ReplyInterrupted."""
    import torch

    prompt = chat_format.render_chat(messages, template=None, tokenizer=tokenizer, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = collecting_streamer(tokenizer)
    t0 = time.perf_counter()
    kwargs = generation.fit_to_context(model, enc["input_ids"].shape[1], settings.generate_kwargs(tokenizer, model))
    stops = set(kwargs["eos_token_id"])
    try:
        if getattr(model, "is_gguf", False):  # llama.cpp, token by token
            streamer.put(enc["input_ids"][0])
            room = kwargs["max_new_tokens"]
            ids, stopped = model.generate(enc["input_ids"][0].tolist(), settings, stops, room,
                                          on_token=lambda tok: streamer.put(torch.tensor([tok])))
            streamer.end()
        elif engine == "static":
            streamer.put(enc["input_ids"][0])  # the prompt, which the streamer skips

            def on_step(_row, tok):
                if tok not in stops:
                    streamer.put(torch.tensor([tok]))

            reply = generation.engine_for(model, tokenizer).generate(
                [enc["input_ids"][0].tolist()], settings, stops, batch_size=1,
                context=generation.context_length(model), on_step=on_step)[0]
            streamer.end()
            ids, stopped = reply.ids, reply.stopped
        else:
            with torch.inference_mode():
                out = model.generate(**enc, streamer=streamer, **kwargs)
            ids, stopped = generation.reply_tokens(out[0, enc["input_ids"].shape[1]:], stops)
    except KeyboardInterrupt:
        streamer.end()  # prints the words still held back, so the screen shows what the partial reply is
        raise ReplyInterrupted({"response": streamer.text.strip(), "tokens": streamer.tokens,
                                "seconds": round(time.perf_counter() - t0, 3)}) from None
    return {"response": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids),
            "seconds": round(time.perf_counter() - t0, 3), "stopped": stopped}


# The seed's dialog asks these, in this order; `settings NAME VALUE` reaches the others.
DIALOG_SETTINGS = ("max_new_tokens", "temperature")


def settings_dialog(settings: generation.GenerationSettings, ask=input):
    """Ask for each of DIALOG_SETTINGS with its current value; Enter keeps it, a refused value is
    asked again, and Ctrl-D or Ctrl-C leaves every setting as it was. Returns (settings, text)."""
    new = settings
    try:
        for name in DIALOG_SETTINGS:
            while True:
                raw = ask(f"New {name} [{getattr(new, name)}]: ").strip()
                if not raw:
                    break
                try:
                    new = new.updated(name, raw)
                    break
                except UserError as exc:
                    print(f"refused: {exc}", flush=True)
    except (EOFError, KeyboardInterrupt):
        return settings, "\nsettings unchanged"
    values = ", ".join(f"{k}={getattr(new, k)}" for k in DIALOG_SETTINGS)
    return new, f"Settings {'updated' if new != settings else 'unchanged'}: {values}"


def handle_command(line: str, settings: generation.GenerationSettings):
    """Apply a `settings ...` command; returns the (possibly new) settings and the text to show."""
    parts = line.replace("=", " ").split()
    if len(parts) == 1:
        return settings_dialog(settings)
    if len(parts) != 3:
        return settings, "usage: settings (asks for each), or settings NAME VALUE (e.g. settings temperature 0.3)"
    try:
        new = settings.updated(parts[1], parts[2])
    except UserError as exc:
        return settings, f"refused: {exc}"
    return new, "settings: " + ", ".join(f"{k}={v}" for k, v in new.as_dict().items())


class Transcript:
    """A chat session as JSON lines: one session line, then a line per turn (and per reset),
    flushed as each is written so a crash or a closed terminal keeps everything said so far."""

    def __init__(self, folder: Path, session: dict):
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        stamp = core.utc_stamp()
        for n in itertools.count(1):
            self.path = folder / (f"chat_{stamp}.jsonl" if n == 1 else f"chat_{stamp}_{n}.jsonl")
            try:
                self._fh = open(self.path, "x", encoding="utf-8")  # never append to another session's file
                break
            except FileExistsError:
                continue
        self.write({"type": "session", **session})

    def write(self, record: dict) -> None:
        record = {**record, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._fh.write(core.to_json(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def chat_turn(model, tokenizer, text: str, system_prompt: str | None, history: list[dict], settings,
              engine: str = "static") -> dict:
    """One reply; a Ctrl-C while it is written stops it and marks it interrupted."""
    try:
        print("assistant> ", end="", flush=True)
        result = stream_reply(model, tokenizer, conversation(text, system_prompt, history), settings, engine)
    except KeyboardInterrupt as exc:
        partial = exc.result if isinstance(exc, ReplyInterrupted) else {"response": "", "tokens": 0, "seconds": 0.0}
        print("[reply stopped; it is left out of the conversation]", flush=True)
        return {"instruction": text, **partial, "interrupted": True}
    return {"instruction": text, **result}


def interactive(model, tokenizer, settings: generation.GenerationSettings, system_prompt: str | None,
                transcript: Transcript | None = None, engine: str = "static"):
    """Run the chat loop; returns (turns, the settings in force at the end). Ctrl-C at the prompt
    ends the chat with ChatInterrupted, which holds both."""
    history: list[dict] = []
    turns: list[dict] = []
    saved = f" (transcript: {transcript.path})" if transcript else ""
    print("Chat ready. Commands: settings, settings NAME VALUE, reset, quit; Ctrl-C stops a reply." + saved, flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:  # at the prompt; one while a reply is written stops only the reply (chat_turn)
            print(flush=True)
            raise ChatInterrupted(turns, settings, transcript.path if transcript else None) from None
        except UnicodeDecodeError:  # stdin is strict UTF-8 under a UTF-8 locale
            line = "\udcff"
        if cli.not_utf8(line) is not None:  # under a C locale the bytes arrive as surrogates instead
            print("refused: that line is not UTF-8 text; type it again (check the terminal's encoding)", flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "reset":
            history = []
            if transcript:
                transcript.write({"type": "reset"})
            print("conversation cleared", flush=True)
            continue
        if text.lower().split()[0] == "settings":
            settings, shown = handle_command(text, settings)
            print(shown, flush=True)
            continue
        try:
            turn = chat_turn(model, tokenizer, text, system_prompt, history, settings, engine)
            if turn.get("stopped") is False:  # the limit, not the model, ended it: say so where it stops
                print(f"\n[reply cut at --max-new-tokens {settings.max_new_tokens}; raise it with "
                      f"`settings max_new_tokens N`]", flush=True)
        except KeyboardInterrupt:  # landed as the reply started or ended, outside its own handler: the same stop
            print("\n[reply stopped; it is left out of the conversation]", flush=True)
            turn = {"instruction": text, "response": "", "tokens": 0, "seconds": 0.0, "interrupted": True}
        if not turn.get("interrupted"):
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": turn["response"]}]
        turn["generation"] = settings.as_dict()  # settings change mid-chat: each reply keeps its own
        turns.append(turn)
        if transcript:
            transcript.write({"type": "turn", "turn": len(turns), **turn, "interrupted": bool(turn.get("interrupted"))})
    print("bye" + saved, flush=True)
    return turns, settings


def run_interactive(model, tokenizer, settings, args, info: dict, output_file: Path):
    """The chat with its transcript beside --output-file; returns (turns, final settings)."""
    transcript = Transcript(output_file.parent, {
        "model_path": args.model_path, "base_model": info.get("base_model"), "adapter": info.get("adapter"),
        "backend": info.get("backend"), "engine": args.engine, "system_prompt": args.system_prompt,
        "generation": settings.as_dict(),
    })
    try:
        return interactive(model, tokenizer, settings, args.system_prompt, transcript, args.engine)
    finally:
        transcript.close()
