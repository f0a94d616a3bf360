"""The card of a released synthetic dataset: `DATASET_CARD.md` for people, `dataset.json` for programs
(docs/DESIGN.md, "Releasing a synthetic dataset").

It says how the set was made (generator, seed, count, format, classes) and copies the generator's privacy
statement: the `privacy` section of utils/evaluation/model_card.py (`privacy_section`, computed from the ledger, or
read from the `model_card.json` beside a `generator.onnx`), in plain words: epsilon, delta and what the guarantee is
about; "NO privacy guarantee" plainly when epsilon is infinite or no ledger came with the generator. Writing a set
is post-processing of the generator: it reads no data and spends no privacy. Imports no torch (generate.py's ONNX
path runs without it).
"""
import math
import os

from utils.run.files import read_json, write_json, write_text

CARD_MD, CARD_JSON = "DATASET_CARD.md", "dataset.json"
POST_PROCESSING = ("Writing this dataset read no data and spent no privacy budget: the images and labels are "
                   "post-processing of the generator, so the generator's guarantee covers them, whatever their "
                   "number, and anything computed from them alone.")
UNKNOWN = ("NO privacy guarantee is known: the generator came without its privacy ledger (no model_card.json "
           "beside generator.onnx), so none can be claimed. Treat these images as you would the data the "
           "generator was trained on.")


def epsilon_text(value) -> str:
    return "inf" if value == "inf" or (isinstance(value, float) and math.isinf(value)) else f"{value:.3f}"


def privacy_words(privacy) -> list:
    """The plain-words paragraphs of the card: the guarantee (or its absence) and what it covers."""
    if privacy is None:
        return [f"**WARNING**: {UNKNOWN}"]
    if privacy["epsilon_total"] == "inf":
        return [f"**WARNING: NO privacy guarantee** (epsilon = inf). {privacy['statement']}",
                "Do not treat these images as private: handle them as you would the private data itself."]
    public = "; ".join(f"{read['stage']}: {read['size']} images of the {read['split']} split"
                       for read in privacy["public_data"])
    scope = ("It is about the private split only" + (f": the public data that shaped the generator ({public}) is "
                                                    f"not protected by it" if public else "") + ".")
    if not privacy["mechanisms"]:
        return ["**The private split was never read** (epsilon = 0 with respect to it): the generator learnt "
                "from public data only, which these images may reveal.", POST_PROCESSING]
    return [f"**Differential privacy: epsilon = {epsilon_text(privacy['epsilon_total'])}, delta = "
            f"{privacy['delta']:g}.** {privacy['statement']}", scope, POST_PROCESSING]


def build_card(*, made: dict, privacy, per_class: dict) -> dict:
    """The card's content: `made` (how: generator, seed, count, format, files, image shape, class names, ...), the
    generator's privacy section (None where none came with it) and the images per class."""
    return {"made": made, "per_class": per_class,
            "privacy": privacy if privacy is not None else {"guarantee": False, "epsilon_total": "unknown",
                                                            "statement": UNKNOWN},
            "privacy_known": privacy is not None, "privacy_in_words": privacy_words(privacy),
            "post_processing": POST_PROCESSING}


def render_markdown(card: dict) -> str:
    made, privacy = card["made"], card["privacy"]
    lines = [f"# Dataset card: {made['name']}", "",
             f"{made['num_samples']} class-balanced synthetic images ({made['image_shape_text']}) with their labels, "
             f"written by generate.py from {made['generator_text']}.", "", "## Privacy", ""]
    lines += [paragraph + "\n" for paragraph in card["privacy_in_words"]]
    if card["privacy_known"]:
        lines += [f"- epsilon (total, all stages): {epsilon_text(privacy['epsilon_total'])}; delta: "
                  f"{privacy['delta']:g}; accountant: {privacy['accountant'].upper()} (Opacus); adjacency: "
                  f"{privacy['adjacency']}",
                  f"- DP-SGD mechanisms on the private split: {len(privacy['mechanisms'])}; reads of it without DP: "
                  f"{len(privacy['non_dp_reads'])} (any one makes epsilon infinite)", ""]
    lines += ["## How it was made", "",
              f"- generator: {made['generator_text']}, computed by {made['computed_by']}",
              f"- latent vectors: {made['latents']}", f"- seed {made['seed']}, {made['num_samples']} images",
              f"- format: {made['format_text']}", f"- pixels: {made['pixels']}", "",
              "| label | class | images |", "|---|---|---|"]
    lines += [f"| {label} | {name} | {count} |" for label, (name, count) in enumerate(card["per_class"].items())]
    return "\n".join(lines) + "\n"


def write_dataset_card(directory: str, card: dict) -> tuple:
    md_path, json_path = os.path.join(directory, CARD_MD), os.path.join(directory, CARD_JSON)
    write_json(json_path, card)
    write_text(md_path, render_markdown(card))
    return md_path, json_path


def read_card(path: str):
    """The dataset.json of the set at `path` (its folder, or beside its .npz), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return read_json(os.path.join(folder, CARD_JSON))
