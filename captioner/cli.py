"""The ``captioner`` command: synth, train, caption, score, evaluate, calibrate, calibrate-trust, inspect, plot, serve.

A user error prints one line, ``captioner: error: ...``, and exits with status 1 (2 for bad
command-line usage); never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from captioner.errors import CaptionerError
from captioner.options import (
    CalibrateOptions,
    CaptionJob,
    DecodeOptions,
    MODES,
    DecodingDefaultOptions,
    EvaluateOptions,
    InspectOptions,
    PlotOptions,
    ScoreOptions,
    ServeOptions,
    SynthOptions,
    PRESETS,
    TrainConfig,
    TrustOptions,
    add_dataclass_arguments,
    field_types,
    parse_decoding,
    from_args,
)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking lines inside hyphenated words such as novel-captions."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, generated from the option dataclasses in captioner.options."""
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, classes) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=_HelpFormatter)
        for cls in classes:
            add_dataclass_arguments(p.add_argument_group("decoding") if cls is DecodeOptions else p, cls)
    return parser


def cmd_synth(options: SynthOptions) -> None:
    from captioner.shapes import write_shapes_dataset

    path = write_shapes_dataset(
        Path(options.out_dir),
        num_images=options.images,
        seed=options.seed,
        image_size=options.image_size,
        holdout=options.holdout,
        progress=True,
    )
    print(path)


def cmd_train(config: TrainConfig) -> None:
    from captioner.training import train

    best = train(config)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all
        return
    out = Path(config.out)
    truthful = f", truthful {best['val_truthfulness']:.1%}" if "val_truthfulness" in best else ""
    print(
        f"best epoch {best['epoch']}: val perplexity {best['val_perplexity']:.3f}, "
        f"BLEU-4 {best['val_bleu_4']:.3f}, CIDEr {best['val_cider']:.3f}{truthful}\nmodel: {out / 'model.pt'}"
    )


def cmd_caption(job: CaptionJob, given: dict) -> None:
    if job.engine == "ray":
        # The driver never imports torch, so it cannot read the checkpoint's default decoding: on
        # Ray the options named are all there is (docs/ray.md).
        options = DecodeOptions.resolve({}, given)
        try:
            from captioner.batch_ray import run_ray_job
        except ImportError as exc:
            raise CaptionerError(f"--engine ray needs Ray Data ({exc.name} is missing): pip install 'captioner[ray]'") from None
        run_ray_job(job, options, out=sys.stdout)
        return
    import torch

    from captioner.batch import caption_paths, run_batch_job
    from captioner.models.captioner import Captioner
    from captioner.records import RecordFormat, collect_inputs
    from captioner.distributed import init_process, process_device, shutdown
    from captioner.runtime import decoding_workers, resolve_device, torch_threads

    paths = collect_inputs(job.inputs)
    device = resolve_device(process_device(job.device))
    process = init_process(device)
    try:
        if process.distributed and not job.output:
            raise CaptionerError("under torchrun, --output is needed: each process writes its part of it")
        model = Captioner.load(job.model, device, cnn=job.cnn)
        options = model.decode_options(**given)
        workers = decoding_workers() if job.num_workers is None else job.num_workers
        if not os.environ.get("OMP_NUM_THREADS"):  # torchrun sets it when it starts several processes
            # The CNN's pool leaves a CPU to the main thread writing captions and one to each decoding worker.
            torch.set_num_threads(torch_threads(reserved=1 + workers))
        settings = dict(batch_size=job.batch_size, num_workers=workers)
        if job.output:
            run_batch_job(model, paths, options, Path(job.output), format=job.format, process=process, progress=True, **settings)
            return
        records = RecordFormat(job.format, options.num_captions)
        sys.stdout.write(records.header())
        for record in caption_paths(model, paths, options, **settings):
            sys.stdout.write(records.line(record))
            sys.stdout.flush()
    finally:
        shutdown()


def cmd_score(job: ScoreOptions) -> None:
    import torch

    from captioner.batch import run_score_job, score_pairs
    from captioner.models.captioner import Captioner
    from captioner.records import ScoreFormat, read_pairs
    from captioner.runtime import resolve_device, torch_threads

    pairs = read_pairs(job.pairs, job.images)  # a bad file is an error before the model loads
    model = Captioner.load(job.model, resolve_device(job.device))
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(torch_threads(reserved=1))  # a CPU for the main thread scoring
    settings = dict(batch_size=job.batch_size, max_words=job.max_words)
    if job.output:
        run_score_job(model, pairs, Path(job.output), format=job.format, progress=True, **settings)
        return
    records = ScoreFormat(job.format)
    sys.stdout.write(records.header())
    for record in score_pairs(model, pairs, **settings):
        sys.stdout.write(records.line(record))
        sys.stdout.flush()


def cmd_calibrate_trust(job: TrustOptions) -> None:
    from captioner.checkpoint import file_digest, read_checkpoint, save_checkpoint
    from captioner.data.datasets import load_dataset
    from captioner.evaluation import calibrate_trust
    from captioner.features import cached_features, default_cache_dir
    from captioner.io import atomic_write, strict_json
    from captioner.models.captioner import Captioner
    from captioner.runtime import resolve_device

    dataset = load_dataset(job.data, format=job.format, images=job.images, skip_missing=job.skip_missing)
    records = dataset.split(job.split)
    state = read_checkpoint(job.model)
    device = resolve_device(job.device)
    model = Captioner.from_checkpoint(state, source=Path(job.model).name).to(device).eval()
    cache = Path(job.feature_cache) if job.feature_cache else default_cache_dir()
    paths = [r.path for r in records]
    features = cached_features(model.encoder, paths, cache_dir=cache, device=device, batch_size=job.batch_size, progress=True)
    calibration, report = calibrate_trust(
        model, records, features, flagged=job.flagged, seed=job.seed, beam_size=job.beam_size,
        fitted_on={"data": dataset.name, "split": job.split, "model": file_digest(job.model)}, progress=True,
    )  # fmt: skip
    state["trust"] = calibration.to_dict()
    save_checkpoint(state, job.output or job.model)
    if job.report:
        with atomic_write(job.report, "w") as f:
            f.write(strict_json(report, indent=2) + "\n")
    quality = {k: "n/a" if v is None else f"{v:.3f}" for k, v in calibration.quality.items()}
    print(
        f"trust calibrated on {calibration.fitted_on['fitted_images']} of {len(records)} {job.split} photographs; on the others, "
        f"the score ranks own references above others' with AUC {quality['score_auc']} (near {quality['score_auc_near']}, "
        f"random {quality['score_auc_far']}), the confidence of generated captions follows their CIDEr-D with Kendall tau "
        f"{quality['confidence_kendall_tau_with_cider']}; unfamiliar below cosine {_threshold(calibration.threshold)}\n"
        f"model: {job.output or job.model}"
    )


def _threshold(value: float | None) -> str:
    return "n/a (no caption memory)" if value is None else f"{value:.4f}"


def cmd_evaluate(job: EvaluateOptions, given: dict) -> None:
    from captioner.data.datasets import load_dataset
    from captioner.evaluation import coco_results, evaluate_split, summary_table
    from captioner.io import atomic_write, strict_json
    from captioner.models.captioner import Captioner
    from captioner.runtime import resolve_device

    dataset = load_dataset(job.data, format=job.format, images=job.images, skip_missing=job.skip_missing)
    dataset.split(job.split)  # an absent split is an error before the model loads
    model = Captioner.load(job.model, resolve_device(job.device), cnn=job.cnn)
    report, captions = evaluate_split(model, dataset, job.split, options=model.decode_options(**given), batch_size=job.batch_size, progress=True)
    text = strict_json(report, indent=2)
    for path, content in ((job.output, text), (job.save_captions, strict_json(coco_results(captions), indent=1))):
        if path:
            with atomic_write(path, "w") as f:
                f.write(content + "\n")
    print(summary_table(report), file=sys.stderr)  # for people; standard output stays one JSON object
    print(text)


def cmd_calibrate(job: CalibrateOptions) -> None:
    from captioner.checkpoint import read_checkpoint, save_checkpoint
    from captioner.data.datasets import load_dataset
    from captioner.evaluation import int8_agreement
    from captioner.features import image_batches
    from captioner.models.captioner import Captioner

    dataset = load_dataset(job.data, format=job.format, images=job.images, skip_missing=job.skip_missing)
    paths = [record.path for record in dataset.split(job.split)]
    if len(paths) < 2:
        raise CaptionerError(f"the {job.split} split has too few images to calibrate on")
    state = read_checkpoint(job.model)
    model = Captioner.from_checkpoint(state, source=Path(job.model).name).eval()
    # Images evenly over the split, alternately to calibrate and to check: never the same ones.
    count = min(job.count, len(paths) // 2)
    chosen = paths[:: len(paths) // (2 * count)][: 2 * count]
    calibration, check = chosen[0::2], chosen[1::2]
    model.encoder.calibrate(image_batches(calibration, model.transform, job.batch_size, progress=True))
    agreement = int8_agreement(model, check, batch_size=job.batch_size)
    state["encoder"]["int8_calibration"] = model.encoder.int8_calibration
    save_checkpoint(state, job.output or job.model)
    print(
        f"int8 CNN calibrated on {len(calibration)} {job.split} images; on {len(check)} others its features have "
        f"cosine similarity {agreement['mean_cosine']:.4f} to fp32 (lowest {agreement['min_cosine']:.4f}), "
        f"and {agreement['same_caption']:.1%} of the greedy captions are the same\nmodel: {job.output or job.model}"
    )


def cmd_inspect(job: InspectOptions, given: dict) -> None:
    from captioner.data.datasets import load_dataset
    from captioner.inspection import inspect_images, inspect_split, training_history
    from captioner.models.captioner import Captioner
    from captioner.records import collect_inputs
    from captioner.runtime import resolve_device

    paths = collect_inputs(job.inputs)
    dataset = job.data and load_dataset(job.data, format=job.format, images=job.images)
    if dataset:
        dataset.split(job.split)  # an absent split is an error before the model loads
    model = Captioner.load(job.model, resolve_device(job.device))
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    written = inspect_images(model, paths, model.decode_options(**given), out)
    if dataset:
        history = training_history(Path(job.model))
        written += inspect_split(model, dataset, job.split, out, max_captions=job.max_captions,
                                 gradient_captions=job.gradient_captions, history=history)  # fmt: skip
    print("\n".join(map(str, written)))


def cmd_plot(options: PlotOptions) -> None:
    from captioner.plotting import plot_run

    print(plot_run(options.run_dir, options.output))


def cmd_serve(options: ServeOptions) -> None:
    from service import serve

    serve(options.model, host=options.host, port=options.port, cnn=options.cnn, api_keys_file=options.api_keys_file)


def cmd_decoding(job: DecodingDefaultOptions) -> None:
    from captioner.checkpoint import read_checkpoint, save_checkpoint
    from captioner.io import strict_json

    state = read_checkpoint(job.model)
    if job.set is not None:
        state["decoding"] = parse_decoding(job.set)
        save_checkpoint(state, job.model)  # atomic, with a new checksum
    print(strict_json(state.get("decoding", {})))


# Each subcommand: its function, its help, and the option dataclasses its arguments come from.
COMMANDS = {
    "synth": (cmd_synth, "generate the shapes world data set", (SynthOptions,)),
    "train": (cmd_train, "train a captioner", (TrainConfig,)),
    "caption": (
        cmd_caption,
        "caption images (files, folders, or text files listing images)",
        (CaptionJob, DecodeOptions),
    ),
    "score": (
        cmd_score,
        "score given captions of images: log-probability, every word's probability, and how well each describes its image",
        (ScoreOptions,),
    ),
    "evaluate": (cmd_evaluate, "score a model on a data set split", (EvaluateOptions, DecodeOptions)),
    "calibrate": (
        cmd_calibrate,
        "calibrate a model's CNN for int8 inference on the CPU (captioner caption --cnn int8)",
        (CalibrateOptions,),
    ),
    "calibrate-trust": (
        cmd_calibrate_trust,
        "fit how captions are scored, and when a photograph is unfamiliar, on a dev split (captioner score, caption confidence)",
        (TrustOptions,),
    ),
    "inspect": (
        cmd_inspect,
        (
            "look inside the decoder: attention, gates and cells per word; over a split (--data) interpretable "
            "cells, gate saturation and gradients through time"
        ),
        (InspectOptions, DecodeOptions),
    ),
    "decoding": (
        cmd_decoding,
        "show or change the decoding a model answers with when asked for none (its default decoding)",
        (DecodingDefaultOptions,),
    ),
    "plot": (cmd_plot, "draw a run's training curves (loss, perplexity, gradient norm, BLEU-4, CIDEr)", (PlotOptions,)),
    "serve": (
        cmd_serve,
        "serve a model over HTTP (development server; production: gunicorn -c service/gunicorn.conf.py)",
        (ServeOptions,),
    ),
}


def given_options(argv: list[str], command: str) -> set[str]:
    """The options of ``command`` that ``argv`` names, whatever their values (a preset leaves them be)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[command]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def decoding_given(argv: list[str], args: argparse.Namespace) -> dict:
    """The decoding options ``argv`` names, by name; a value no mode takes is refused before the
    model loads (which mode applies waits for the model's default decoding)."""
    given = {name: getattr(args, name) for name in given_options(argv, args.command) & set(field_types(DecodeOptions))}
    errors = []
    for mode in [given["mode"]] if "mode" in given else MODES:
        try:
            DecodeOptions.resolve({"mode": mode}, given)
            return given
        except CaptionerError as exc:
            errors.append(exc)
    raise errors[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command, _, classes = COMMANDS[args.command]
    try:
        # Bad values: CaptionerError, one line. Decoding options are those named: the rest come from
        # the model's default decoding, once it is loaded (``Captioner.decode_options``).
        configs = [from_args(cls, args) if cls is not DecodeOptions else decoding_given(argv, args) for cls in classes]
        if args.command == "train" and args.preset:  # an option given as its default value is still given
            for name in given_options(argv, "train") & set(PRESETS[args.preset]):
                setattr(configs[0], name, getattr(args, name))
        command(*configs)
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
