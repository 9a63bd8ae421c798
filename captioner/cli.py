"""The ``captioner`` command: synth, train, caption, evaluate, plot, serve.

A user error prints one line, ``captioner: error: ...``, and exits with status 1 (2 for bad
command-line usage); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from captioner.errors import CaptionerError


def _decode_args(parser: argparse.ArgumentParser) -> None:
    from captioner.options import DecodeOptions

    d = DecodeOptions()
    g = parser.add_argument_group("decoding")
    g.add_argument("--mode", choices=["greedy", "sample", "beam"], default=d.mode)
    g.add_argument("--num-captions", type=int, default=d.num_captions, help="captions per image (sample, beam)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (> 0)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k likeliest words (0: all)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--beam-size", type=int, default=d.beam_size)
    g.add_argument("--max-length", type=int, default=d.max_length, help="most words per caption")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _decode_options(args):
    from captioner.options import DecodeOptions

    return DecodeOptions(
        mode=args.mode,
        num_captions=args.num_captions,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        beam_size=args.beam_size,
        max_length=args.max_length,
        seed=args.seed,
    )


# Help for ``captioner train``; defaults come from TrainConfig, the one place they live.
TRAIN_HELP = {
    "data": "data set file (Karpathy JSON, COCO captions JSON, Flickr token file or CSV)",
    "out": "run folder for model.pt, last.pt and metrics.jsonl",
    "format": "data set format: auto, karpathy, coco, flickr, csv",
    "images": "image folder (default: beside the data set file)",
    "skip_missing": "leave out images listed but missing on disk",
    "encoder": "torchvision backbone: resnet18/34/50/101/152, mobilenet_v3_small/large (default: by data)",
    "encoder_weights": "none, imagenet, auxiliary (shapes world) or a state_dict file; auto picks",
    "image_size": "encoder input size in pixels (default: 96 shapes world, 224 photos)",
    "pool_grid": "average-pool the CNN's last map to a G x G grid (default: 3 shapes world, 1 photos)",
    "pretrain_epochs": "epochs of auxiliary CNN pretraining on the shapes world",
    "word2vec": "pretrained word2vec file (binary or text); default: train on the captions",
    "embed_dim": "word vector size (must match --word2vec's)",
    "hidden_size": "LSTM hidden size",
    "num_layers": "layers of the language LSTM",
    "dropout": "dropout on features and LSTM outputs",
    "min_count": "words seen fewer times become <unk>",
    "max_caption_length": "training captions are cut to this many words",
    "epochs": "training epochs",
    "batch_size": "captions per step",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "clip_norm": "clip the gradient norm to this",
    "seed": "random seed",
    "device": "auto, cpu, cuda or cuda:N",
    "feature_cache": "feature cache folder (default ~/.cache/captioner/features)",
    "num_workers": "image-decoding worker processes",
    "val_images": "validation images captioned each epoch for BLEU-4/CIDEr",
    "resume": "continue the run in --out from last.pt",
    "progress": "show progress bars",
}


def _train_args(parser: argparse.ArgumentParser) -> None:
    from captioner.options import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        help_text = TRAIN_HELP[f.name] + ("" if f.default in (MISSING, None) else f" (default: {f.default})")
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the shapes world data set")
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, default=4000, help="number of images (default: 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="image width and height in pixels (default: 96)")
    p.add_argument("--holdout", nargs="*", default=[], metavar="COLOUR:SHAPE", help="combinations kept out of training")

    p = sub.add_parser("train", help="train a captioner")
    _train_args(p)

    p = sub.add_parser("caption", help="caption images (files, folders, or text files listing images)")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--output", help="write here instead of standard output; a rerun resumes an unfinished file")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="JSON lines (default) or CSV")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--device", default="auto")
    _decode_args(p)

    p = sub.add_parser("evaluate", help="score a model on a data set split")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--images", help="image folder (default: beside the data set file)")
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="also write the JSON report here")
    p.add_argument("--save-captions", metavar="FILE", help='write the captions as COCO results, [{"image_id", "caption"}]')
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    _decode_args(p)

    p = sub.add_parser("plot", help="draw a run's training curves (loss, perplexity, gradient norm, BLEU-4, CIDEr)")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG file (default: RUN_DIR/curves.png)")

    p = sub.add_parser("serve", help="serve a model over HTTP (development server; production: gunicorn -c service/gunicorn.conf.py)")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return parser


def cmd_synth(args) -> None:
    from captioner.data.synth import write_shapes_dataset

    path = write_shapes_dataset(
        Path(args.out_dir),
        num_images=args.images,
        seed=args.seed,
        image_size=args.image_size,
        holdout=args.holdout,
        progress=True,
    )
    print(path)


def cmd_train(args) -> None:
    from captioner.options import TrainConfig
    from captioner.training import train

    values = {k: v for k, v in vars(args).items() if k != "command"}
    best = train(TrainConfig.from_dict(values))
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all
        return
    out = Path(args.out)
    truthful = f", truthful {best['val_truthfulness']:.1%}" if "val_truthfulness" in best else ""
    print(
        f"best epoch {best['epoch']}: val perplexity {best['val_perplexity']:.3f}, "
        f"BLEU-4 {best['val_bleu_4']:.3f}, CIDEr {best['val_cider']:.3f}{truthful}\nmodel: {out / 'model.pt'}"
    )


def cmd_caption(args) -> None:
    from captioner.batch import RecordFormat, caption_paths, collect_inputs, run_batch_job
    from captioner.distributed import init_process, process_device, shutdown
    from captioner.models.captioner import Captioner
    from captioner.training import resolve_device

    options = _decode_options(args)
    paths = collect_inputs(args.inputs)
    device = resolve_device(process_device(args.device))
    process = init_process(device)
    try:
        if process.distributed and not args.output:
            raise CaptionerError("under torchrun, --output is needed: each process writes its part of it")
        model = Captioner.load(args.model, device)
        settings = dict(batch_size=args.batch_size, num_workers=args.num_workers)
        if args.output:
            run_batch_job(model, paths, options, Path(args.output), format=args.format, process=process, progress=True, **settings)
            return
        records = RecordFormat(args.format, options.num_captions)
        sys.stdout.write(records.header())
        for record in caption_paths(model, paths, options, **settings):
            sys.stdout.write(records.line(record))
            sys.stdout.flush()
    finally:
        shutdown()


def cmd_evaluate(args) -> None:
    from captioner.data.datasets import load_dataset
    from captioner.evaluation import coco_results, evaluate_split, summary_table
    from captioner.models.captioner import Captioner
    from captioner.training import resolve_device

    options = _decode_options(args)
    dataset = load_dataset(args.data, format=args.format, images=args.images, skip_missing=args.skip_missing)
    dataset.split(args.split)  # an absent split is an error before the model loads
    model = Captioner.load(args.model, resolve_device(args.device))
    report, captions = evaluate_split(model, dataset, args.split, options=options, batch_size=args.batch_size, progress=True)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.save_captions:
        Path(args.save_captions).write_text(json.dumps(coco_results(captions), indent=1) + "\n")
    print(summary_table(report), file=sys.stderr)  # for people; standard output stays one JSON object
    print(text)


def cmd_plot(args) -> None:
    from captioner.plotting import plot_run

    print(plot_run(args.run_dir, args.output))


def cmd_serve(args) -> None:
    from service import serve

    serve(args.model, host=args.host, port=args.port)


COMMANDS = {"synth": cmd_synth, "train": cmd_train, "caption": cmd_caption, "evaluate": cmd_evaluate, "plot": cmd_plot, "serve": cmd_serve}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # permissions, full disk, a folder where a file was expected...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"captioner: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
