"""Command line: build model directories.

    python -m clip_export synthetic --arch ViT-B-32 --seed 0 --out build/models/ViT-B-32-synthetic [--int8]
    python -m clip_export pretrained --arch ViT-B-32 [--from-local DIR] --out build/models/ViT-B-32 \
        [--int8] [--force]
    python -m clip_export quantize SRC DST [--force] [--per-token]

``--int8`` also writes an int8 copy to ``<out>-int8`` (or ``--int8-out``); ``--per-token`` quantises its
activations per token, so batches run in one ONNX run (``quantize.py``). The tokenizer is built from
OpenAI's BPE merges file (``--bpe``, or found in the installed ``clip`` package).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clip_serverless.engine.model_dir import ModelDirError

from .architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE


def _tokenizer_json(bpe: Path | None) -> str:
    from .build_tokenizer import build_tokenizer_json, find_bpe_file

    return build_tokenizer_json(bpe or find_bpe_file())


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=DEFAULT_ARCHITECTURE, choices=list(ARCHITECTURES))
    parser.add_argument("--out", type=Path, required=True,
                        help="model directory to write (replaced if present)")
    parser.add_argument("--bpe", type=Path, help="OpenAI's bpe_simple_vocab_16e6.txt.gz (default: find it)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--int8", action="store_true", help="also write an int8 copy")
    parser.add_argument("--int8-out", type=Path, help="where the int8 copy goes (default: <out>-int8)")
    _add_quality_args(parser)


def _add_quality_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="write the int8 model even below the thresholds")
    parser.add_argument("--per-token", action="store_true",
                        help="int8 activation scales per token: a batch in one run, each row as alone "
                             "(single images slower; README, Models)")
    parser.add_argument("--min-cosine", type=float, help="int8 vs fp32 cosine threshold (default 0.99)")
    parser.add_argument("--min-agreement", type=float,
                        help="zero-shot top-1 agreement threshold (default 0.9 for pretrained weights, else 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clip_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic",
                                    help="seeded random weights of a real architecture (offline)")
    _add_export_args(synthetic)
    synthetic.add_argument("--seed", type=int, default=0)
    pretrained = commands.add_parser("pretrained",
                                     help="OpenAI's weights from the Hugging Face Hub or a local directory")
    _add_export_args(pretrained)
    pretrained.add_argument("--from-local", type=Path, metavar="DIR",
                            help="a directory written by CLIPModel.save_pretrained (no network needed)")
    quantize = commands.add_parser("quantize", help="int8 copy of an fp32 model directory, with a report")
    quantize.add_argument("src", type=Path)
    quantize.add_argument("dst", type=Path)
    _add_quality_args(quantize)
    return parser


def _quantize(src: Path, dst: Path, args: argparse.Namespace) -> None:
    from clip_serverless.engine.model_dir import ModelDir

    from .quantize import Thresholds, default_thresholds, quantize_model_dir

    default = default_thresholds(ModelDir.open(src).manifest)
    thresholds = Thresholds(
        min_cosine=default.min_cosine if args.min_cosine is None else args.min_cosine,
        min_top1_agreement=default.min_top1_agreement if args.min_agreement is None else args.min_agreement,
    )
    quantize_model_dir(src, dst, force=args.force, thresholds=thresholds, per_token_activations=args.per_token)


def run(args: argparse.Namespace) -> None:
    if args.command == "quantize":
        _quantize(args.src, args.dst, args)
        return
    tokenizer = _tokenizer_json(args.bpe)
    if args.command == "synthetic":
        from .synthetic import export_synthetic

        export_synthetic(args.out, arch=args.arch, seed=args.seed, tokenizer_json=tokenizer, opset=args.opset)
    else:
        from .pretrained import export_pretrained

        export_pretrained(args.out, arch=args.arch, from_local=args.from_local, tokenizer_json=tokenizer,
                          opset=args.opset)
    if args.int8:
        _quantize(args.out, args.int8_out or args.out.with_name(args.out.name + "-int8"), args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pretrained import PretrainedUnavailable
    from .quantize import QuantizationRefused

    try:
        run(args)
    except QuantizationRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (PretrainedUnavailable, ModelDirError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
