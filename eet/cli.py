"""``eet``: the command line.

    eet build bert [--model DIR | --config JSON|PRESET] [--out DIR] [--dtype fp16|fp32] [--max-batch N]
                   [--max-tokens T] [--max-seq S] [--opt-tokens T] [--export-form FORM]
    eet check DIR  [--batch B] [--max-len L] [--seed N]
"""
from __future__ import annotations

import sys

USAGE = """usage: eet <command> [options]

commands:
  build bert   export a Hugging Face BERT, rewrite it padding-free, build a TensorRT plan
  check DIR    compare Hugging Face, ONNX Runtime and the rewritten graph (plugin references) on a ragged batch

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
        if command == "check":
            from eet.commands import check

            return check.main(rest)
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
