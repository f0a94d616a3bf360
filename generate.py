"""Release a synthetic dataset: labelled images written from a generator, with its privacy statement
(docs/DESIGN.md, "Releasing a synthetic dataset").

Input: a generator run of any stage (--run; default RUN_DIR at the top of this script, else <out>/private/latest,
the DP fine-tuned generator), or a generator.onnx alone (--onnx: ONNX Runtime and numpy, torch is never imported;
the privacy statement comes from the model_card.json beside it, and without one the card says plainly that no
guarantee is known). An audit run's generator is refused: it is never a released model.

Writes <out>/release/<NNNNN>-<desc>/ (built in a hidden directory, numbered once complete; release/latest):
  --format png   one folder per class, `<label>-<class name>/<index>.png`: torchvision's ImageFolder reads it, its
                 sorted folders giving back the labels
  --format npz   dataset.npz: images uint8 (N, H, W, C), labels int64 (N,), class_names (C,)
  DATASET_CARD.md, dataset.json: how the set was made (generator, seed, count, format) and the generator's
                 privacy statement from its ledger, in plain words
--num-samples class-balanced images (labels 0, 1, ..., C-1, 0, ...), the generator's output in 8 bits. The latent
vectors are those evaluate.py draws for --seed: `evaluate.py --synthetic DIR` scores the run's own samples as the
set holds them. The ONNX path draws the same vectors in numpy (utils/gan/latents.py), so its images are the torch
path's within the artifact check's tolerance. Post-processing of the generator: reads no data, spends no privacy.

--device applies to the --run path only. --once skips writing where a set under --out was made from the same
generator with the same seed, count, format and classes (release/latest then points at it); a killed release leaves
no numbered set (a hidden .partial-* directory at most), so it starts again.

Imports stay torch-free at the top (utils/run/cli.py and checkpoint.py import torch only where they use it): only
the --run path imports torch and the rest of the project.
"""
import os
import sys

import numpy as np

from utils.data import synthetic
from utils.data.classes import KNOWN_CLASS_NAMES, class_names, fitting_names
from utils.evaluation.dataset_card import build_card, epsilon_text, read_card, write_dataset_card
from utils.gan import latents
from utils.run.checkpoint import (build_generator, input_run, load_checkpoint, mark_latest, pipeline_root,
                                  relative_to_root)
from utils.run.cli import (NothingToDo, UserError, add_common_args, add_input_arg, make_parser, positive_int,
                           print_config, progress_bar, run_script)
from utils.run.files import read_json

STAGE = "release"
GENERATOR_STAGES = ("teacher", "student", "compact", "private")
# The generator run this script samples, editable here: None means <out>/private/latest; --run overrides it.
# Example: RUN_DIR = "checkpoints/private/00002-quick"
RUN_DIR = None
MODEL_CARD = "model_card.json"  # utils/evaluation/model_card.py's file, beside a private run's generator.onnx
ONNX_BATCH = 256  # images per ONNX Runtime call
ONCE_KEYS = ("generator", "seed", "num_samples", "format", "class_names")  # what makes two sets the same (--once)
PIXELS = "uint8 = floor((x + 1) * 127.5 + 0.5) of the generator's output x in [-1, 1] (as torchvision saves images)"
EXAMPLES = ("python generate.py --num-samples 60000                # <out>/private/latest, PNG folders\n"
            "  python generate.py --format npz --run checkpoints/private/00002-quick\n"
            "  python generate.py --onnx generator.onnx --num-samples 1000   # no torch needed")


def parse_args(argv=None):
    parser = make_parser(__doc__, EXAMPLES)
    source = parser.add_mutually_exclusive_group()
    add_input_arg(source, "--run", "RUN_DIR", "generator run directory, `latest` link or checkpoint file (any stage)",
                  "<out>/private/latest")
    source.add_argument("--onnx", default=None, metavar="FILE",
                        help="a generator.onnx alone, sampled by ONNX Runtime without torch; its privacy statement "
                             "comes from the model_card.json beside it")
    group = parser.add_argument_group("the dataset")
    group.add_argument("--num-samples", type=positive_int, default=60000,
                       help="images to write, class-balanced (the downstream protocol's count)")
    group.add_argument("--format", choices=synthetic.FORMATS, default="png",
                       help="png: one folder of PNGs per class (ImageFolder); npz: one dataset.npz")
    group.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                       help="the class names, in label order (default: the dataset's: Fashion-MNIST's, MNIST's, "
                            "CIFAR-10's, or your folder's classes where its data root still lists them, else "
                            "'class 0', 'class 1', ...; with --onnx, the named sets' only: not a folder's)")
    add_common_args(parser, max_steps=False)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the generator: a run (torch) ...

def from_run(args) -> dict:
    """What `write_release` needs from a generator run: its samples, classes, shape, privacy and provenance."""
    from utils.evaluation.model_card import privacy_section
    from utils.gan.sampling import generated_pool
    from utils.privacy.ledger import is_audit
    from utils.run.distributed import single_process_device
    import torch

    path = input_run(args.run, RUN_DIR, args.out, "private")
    checkpoint = load_checkpoint(path, GENERATOR_STAGES)
    ledger, saved, run_name = checkpoint["privacy"], checkpoint["args"], os.path.basename(checkpoint["run_dir"])
    if is_audit(ledger):
        raise UserError(f"{checkpoint['run_dir']} is an audit run (canaries were inserted into its private "
                        f"data): its generator is never released")
    device = single_process_device(args.device, "generate.py")
    G = build_generator(checkpoint).to(device).eval()
    names = args.class_names or class_names(checkpoint, G.num_classes)  # given ones are checked, not replaced

    def sample(count: int, seed: int) -> tuple:
        images, labels = generated_pool(G, count, seed, device, run_name)
        return synthetic.to_uint8(images.numpy()), labels.numpy()
    where = relative_to_root(checkpoint["run_dir"], pipeline_root(checkpoint["run_dir"]))
    return {"sample": sample, "num_classes": G.num_classes, "image_shape": (G.image_channels, G.image_size,
                                                                            G.image_size),
            "class_names": names, "dataset": ledger["dataset"], "stage": checkpoint["stage"],
            "privacy": privacy_section(ledger, saved.get("delta", 1e-5), saved.get("accountant", "prv"),
                                       checkpoint["stage"], run_name),
            "generator": {"run": where, "stage": checkpoint["stage"], "onnx": None},
            "generator_text": f"the {checkpoint['stage']} run {where} (relative to the pipeline directory)",
            "computed_by": f"torch {torch.__version__} on {device}, float32",
            "latents": "z ~ N(0, I) from torch.Generator().manual_seed(seed) (Generator.sample_inputs, as "
                       "evaluate.py draws them)"}


# ---------------------------------------------------------------- ... or a generator.onnx alone (no torch)

def from_onnx(args) -> dict:
    """`from_run`'s answer for a generator.onnx alone, with ONNX Runtime and numpy only."""
    from utils.compression.ort_runner import generate, load_session, metadata
    import onnxruntime
    if not os.path.isfile(args.onnx):
        raise UserError(f"--onnx {args.onnx}: no such file")
    try:
        session = load_session(args.onnx)
    except Exception as exc:  # ONNX Runtime raises its own exception types for an unreadable model
        raise UserError(f"--onnx {args.onnx}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
    info = metadata(session)
    if not {"nz", "num_classes"} <= set(info):
        raise UserError(f"--onnx {args.onnx}: not a generator.onnx of this project (no nz and num_classes in "
                        f"its metadata)")
    card = read_json(os.path.join(os.path.dirname(os.path.abspath(args.onnx)), MODEL_CARD)) or {}
    if card.get("audit"):
        raise UserError(f"--onnx {args.onnx}: its model card is an audit run's (canaries were inserted into its "
                        f"private data): its generator is never released")
    nz, num_classes = int(info["nz"]), int(info["num_classes"])
    dataset = card.get("data", {}).get("dataset")

    def sample(count: int, seed: int) -> tuple:
        z, labels = latents.sample_inputs(count, nz, num_classes, seed)
        images = [synthetic.to_uint8(generate(session, z[i:i + ONNX_BATCH], labels[i:i + ONNX_BATCH]))
                  for i in progress_bar(range(0, count, ONNX_BATCH), desc="generate (ONNX Runtime)", leave=False)]
        return np.concatenate(images), labels
    return {"sample": sample, "num_classes": num_classes, "image_shape": tuple(session.get_outputs()[0].shape[1:]),
            "class_names": args.class_names or fitting_names(num_classes, KNOWN_CLASS_NAMES.get(dataset)),
            "dataset": dataset, "stage": "onnx", "privacy": card.get("privacy"),
            "generator": {"run": None, "stage": None, "onnx": os.path.realpath(args.onnx)},
            "generator_text": f"{os.path.realpath(args.onnx)} alone",
            "computed_by": f"onnxruntime {onnxruntime.__version__} (CPU)",
            "latents": "z ~ N(0, I): torch.Generator().manual_seed(seed)'s draw reproduced in numpy "
                       "(utils/gan/latents.py; equal to float rounding)"}


# ---------------------------------------------------------------- writing

def made_of(source: dict, args) -> dict:
    """How the set is made, for its card (and for --once: ONCE_KEYS)."""
    channels, height, width = source["image_shape"]
    png = args.format == "png"
    return {"name": f"synthetic {source['dataset'] or 'images'} ({args.desc})", "num_samples": args.num_samples,
            "seed": args.seed, "format": args.format,
            "format_text": ("one folder of PNGs per class, `<label>-<class name>/<index>.png` (torchvision's "
                            "ImageFolder)" if png else
                            "dataset.npz: images uint8 (N, H, W, C), labels int64 (N,), class_names"),
            "files": "<class folder>/<index>.png" if png else synthetic.NPZ_NAME,
            "class_folders": synthetic.class_folder_names(source["class_names"]) if png else None,
            "image_shape": [channels, height, width],
            "image_shape_text": f"{height}x{width}, {channels} channel{'s' if channels != 1 else ''}",
            "class_names": list(source["class_names"]), "dataset": source["dataset"],
            "generator": source["generator"], "generator_text": source["generator_text"],
            "computed_by": source["computed_by"], "latents": source["latents"] + "; labels i mod C",
            "pixels": PIXELS, "order": "file index i is sample i of the seeded draw"}


def write_release(source: dict, made: dict, out: str) -> tuple:
    """Sample, write the set and its card in a hidden directory, then number it: a set is complete or absent.
    Returns (its directory, its card)."""
    staging = synthetic.staging_dir(os.path.join(out, STAGE))
    try:
        images, labels = source["sample"](made["num_samples"], made["seed"])
        if made["format"] == "png":
            synthetic.write_png_tree(staging, images, labels, source["class_names"])
        else:
            synthetic.write_npz(staging, images, labels, source["class_names"])
        card = build_card(made=made, privacy=source["privacy"],
                          per_class=synthetic.count_per_class(labels, source["class_names"]))
        write_dataset_card(staging, card)
        return synthetic.publish(staging, out, STAGE, made["desc"]), card
    finally:
        synthetic.discard(staging)  # gone once published; left only by a failure


def finished_release(stage_dir: str, made: dict):
    """The newest set under `stage_dir` made with these settings (ONCE_KEYS, from its dataset.json), or None."""
    for directory in synthetic.numbered_dirs(stage_dir):
        card = read_card(directory)
        if card and all(card["made"].get(key) == made[key] for key in ONCE_KEYS):
            return directory
    return None


def check_source(source: dict):
    """Refuse, before anything is written, class names that do not fit the generator."""
    if len(source["class_names"]) != source["num_classes"]:
        raise UserError(f"{len(source['class_names'])} class names for a generator of {source['num_classes']} "
                        f"classes: give one name per class (--class-names)")


def main(args):
    if args.dry_run:
        print_config(args)
        return None
    source = from_onnx(args) if args.onnx else from_run(args)
    check_source(source)
    args.desc = args.desc or f"{source['stage']}-{args.format}-{args.num_samples}"
    made = {**made_of(source, args), "desc": args.desc}
    done = finished_release(os.path.join(args.out, STAGE), made) if args.once else None
    if done:
        mark_latest(done)
        raise NothingToDo(f"{STAGE}: skipped: {done} was written with these settings (--once); {STAGE}/latest "
                          f"points at it")
    target, card = write_release(source, made, args.out)
    privacy = card["privacy"]
    if privacy["epsilon_total"] in ("inf", "unknown"):
        print("WARNING: " + card["privacy_in_words"][0].replace("**", ""), file=sys.stderr)
    epsilon = epsilon_text(privacy["epsilon_total"]) if card["privacy_known"] else "unknown"
    print(f"{STAGE}: {args.num_samples} images ({args.format}) from {source['generator_text']}; epsilon {epsilon}"
          f"\n{STAGE}: run directory {target}", flush=True)
    return target


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
