"""``eet``: the command line.

    eet build bert [--model DIR | --config JSON|PRESET] [--out DIR] [--dtype fp16|fp32] [--max-batch N]
                   [--max-tokens T] [--max-seq S] [--opt-tokens T] [--export-form FORM]
    eet build gpt2 [--model DIR | --config small|medium|large|xl|JSON] [--out DIR] ...
    eet check DIR  [--batch B] [--max-len L] [--seed N] [--engine auto|yes|no]
    eet run DIR    (--text T ... | --ids 'ID ID' ... | --random N) [--max-new-tokens N] [sampling]
    eet bench DIR  [--batch B] [--max-len L] [--past P] [--new-tokens N] [--iters N]
    eet warm DIR   [--device N] [--runtime-cache FILE|auto]
"""
from __future__ import annotations

import sys

USAGE = """usage: eet <command> [options]

commands:
  build bert   export a Hugging Face BERT, rewrite it padding-free, build a TensorRT plan
  build gpt2   export a Hugging Face GPT-2, rewrite it for pre-padding generation, build a TensorRT plan
  check DIR    accuracy: the engine (on a GPU it runs on) or its graph with the plugin references, against
               ONNX Runtime and Hugging Face
  run DIR      run the engine: encode (BERT) or generate (GPT-2) from the command line
  bench DIR    latency and throughput of the engine against Hugging Face PyTorch and a plain TensorRT engine
  warm DIR     run every shape bucket once on this GPU and keep the compiled kernels in the runtime cache file

`eet <command> --help` for options."""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; user errors print ``error: ...`` and return 2."""
    from eet.errors import EetError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "build":
            from eet.commands import build

            return build.main(rest)
        if command in ("check", "run", "bench", "warm"):
            import importlib

            return importlib.import_module(f"eet.commands.{command}").main(rest)
        if command in ("--version", "version"):
            import eet

            print(eet.__version__)
            return 0
    except EetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
