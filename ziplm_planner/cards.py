"""Model cards: a README.md with Hugging Face front matter in every member folder and in the family
folder, made from the run's own records (report.json, with the scores `evaluate` adds), and written
again whenever those change. Light: no torch import.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .aliases import MEMBER_RECORD
from .atomic import atomic_write_text
from .family import MEMBER_GGUF, MEMBER_ONNX, read_report, timed_shape

log = logging.getLogger(__name__)

CARD = "README.md"
CARD_COLUMNS = ("target", "folder", "status", "predicted_speedup", "measured_speedup", "parameters", "kept_attention",
                "kept_kv_groups", "kept_ffn")
TAGS = ["pruned", "structured-pruning", "ziplm-planner"]
SOURCE_CARD_FIELDS = ("license", "license_name", "license_link", "language", "library_name", "pipeline_tag")


def source_card(folder: Path | None) -> dict:
    """The front matter of the source model's own card (its licence, language, library), if it has one."""
    from huggingface_hub import metadata_load

    try:
        data = metadata_load(folder / CARD) if folder is not None and (folder / CARD).is_file() else None
    except (OSError, ValueError):  # a card whose front matter is not YAML: nothing to carry over
        data = None
    return {key: data[key] for key in SOURCE_CARD_FIELDS if isinstance(data, dict) and key in data}


def front_matter(fields: dict) -> str:
    """YAML front matter (JSON is YAML): one `key: value` line per field."""
    lines = [f"{key}: {json.dumps(value)}" for key, value in fields.items() if value not in (None, [], "")]
    return "---\n" + "\n".join(lines) + "\n---\n"


def member_front_matter(metadata: dict, remote_code: bool) -> dict:
    source = metadata.get("source_card") or {}
    library = "sentence-transformers" if source.get("library_name") == "sentence-transformers" else "transformers"
    return {**source, "base_model": metadata.get("base_model"), "library_name": library,
            "tags": TAGS + (["custom_code"] if remote_code else [])}


def speedup_line(row: dict) -> str:
    if row["measured_speedup"] is None:
        return f"not measured (`--no-verify`); predicted {row['predicted_speedup']:.2f}x"
    low, high = row.get("speedup_interval") or (math.nan, math.nan)
    return (f"**{row['measured_speedup']:.2f}x** (90% interval {low:.2f}-{high:.2f}, {row.get('verify_rounds', '?')} "
            f"interleaved rounds; {row['status']})")


def timed_on(metadata: dict) -> str:
    spec, machine = metadata.get("spec") or {}, metadata.get("machine") or {}
    shape = timed_shape(spec)
    where = machine.get("gpu") or f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
    weights = f"{spec['gguf_type']} GGUF weights" if spec.get("gguf_type") else spec.get("dtype", "float32")
    return (f"{spec.get('backend', '?')} on {spec.get('device', 'cpu')} ({where}), {weights}, "
            f"{spec.get('threads', '?')} threads, {shape}; the {metadata.get('estimator', 'p10')} of each model's "
            f"times against the dense model's in the same rounds")


def quality_lines(row: dict, dense: dict | None, metadata: dict) -> list[str]:
    meta = metadata.get("scores_meta") or {}
    lines = []
    for key, value in (row.get("scores") or {}).items():
        label = (meta.get(key) or {}).get("label", key)
        dense_value = ((dense or {}).get("scores") or {}).get(key)
        versus = "" if dense_value is None or row is dense else f" (dense {dense_value:.4g})"
        lines.append(f"| {label} | {value:.4g}{versus} |")
    return lines or ["| quality | not evaluated yet: `ziplm-planner evaluate FAMILY --task ...` |"]


def recovery_line(row: dict) -> str:
    if row.get("recovery", "none") == "none":
        return "none (one-shot: second-order weight updates only)"
    line = (f"{row['recovery']}: distilled from the dense model on {row['train_tokens']:,} tokens "
            f"({row['train_steps']} steps, {row['prune_steps']} prune step{'s' if row['prune_steps'] != 1 else ''})")
    if row.get("speedup_after_training") is not None:
        line += (f"; verified at {row['speedup_before_training']:.2f}x before training, it re-timed at "
                 f"{row['speedup_after_training']:.2f}x after, below its band, and was pruned on from the trained "
                 "weights, untrained")
    return line


def load_section(auto: str, remote_code: bool, sentence_transformers: bool, onnx_file: bool, gguf_file: bool) -> str:
    onnx = ("With ONNX Runtime: `onnxruntime.InferenceSession(\"path/to/this/folder/model.onnx\")`.\n"
            if onnx_file else "")
    gguf = ("\nWith llama.cpp: `llama-cli -m path/to/this/folder/model.gguf`, or "
            "`llama_cpp.Llama(model_path=\"path/to/this/folder/model.gguf\")`.\n" if gguf_file else "")
    remote = ", trust_remote_code=True" if remote_code else ""
    why = ("Its architecture's own config cannot state its layers' sizes (they differ, or a layer keeps heads "
           "narrower than the hidden size gives them): `modeling_ziplm.py` in this folder (torch and transformers "
           "only) builds them from config.json, hence `trust_remote_code=True`.\n\n" if remote_code else "")
    st = (f"```python\nfrom sentence_transformers import SentenceTransformer\n"
          f"model = SentenceTransformer(\"path/to/this/folder\"{remote})\n```\n\n" if sentence_transformers else "")
    return (f"## How to load it\n\n{why}```python\nimport transformers\n"
            f"model = transformers.{auto}.from_pretrained(\"path/to/this/folder\"{remote})\n```\n\n{st}"
            "With ziplm-planner: `ziplm_planner.load_pruned(\"path/to/this/folder\")`.\n" + onnx + gguf)


def member_card(folder: Path, row: dict, dense: dict | None, metadata: dict) -> str:
    record = json.loads((folder / MEMBER_RECORD).read_text())
    remote_code = bool(record.get("remote_code"))
    source = metadata.get("model", "?")
    title = f"{source}, dense reference" if row["target"] == 1 else f"{source} pruned for {row['target']:g}x"
    share = f" ({row['parameters'] / dense['parameters']:.0%} of dense)" if dense else ""
    table = ["| | |", "|---|---|", f"| target speedup | {row['target']:g}x |", f"| measured speedup | {speedup_line(row)} |",
             f"| {'planned for' if row['measured_speedup'] is None else 'timed on'} | {timed_on(metadata)} |",
             f"| file timed | {row.get('timed_file') or '-'} |",
             f"| parameters | {row['parameters']:,}{share} |", *quality_lines(row, dense, metadata),
             f"| recovery | {recovery_line(row)} |", f"| method | {metadata.get('method', '?')} |",
             f"| made | {metadata.get('created', '?')} with ziplm-planner "
             f"{(metadata.get('versions') or {}).get('ziplm-planner', '?')} |"]
    layers = (f"Kept per layer: query heads {row['kept_attention']}, KV heads {row['kept_kv_groups']}, "
              f"FFN neurons {row['kept_ffn']} (0: the block is removed).\n")
    command = f"## How it was made\n\n```\n{metadata['command']}\n```\n\n" if metadata.get("command") else ""
    sentence_transformers = (folder / "modules.json").is_file()
    return (front_matter(member_front_matter(metadata, remote_code)) + f"\n# {title}\n\n"
            f"A structured-pruned model: attention heads and FFN neurons are removed, not masked, chosen by "
            f"their loss-to-runtime trade-off on a latency table of the machine below "
            f"([ziplm-planner](https://pypi.org/project/ziplm-planner/), after ZipLM).\n\n"
            + "\n".join(table) + "\n\n" + layers + "\n" + command
            + load_section(record.get("auto_class", "AutoModel"), remote_code, sentence_transformers,
                           (folder / MEMBER_ONNX).is_file(), (folder / MEMBER_GGUF).is_file()))


def family_card(report: dict) -> str:
    metadata, rows = report["metadata"], report["members"]
    keys = sorted({key for row in rows for key in (row.get("scores") or {})})
    header = ["member", "target", "measured speedup", "90% interval", "status", "parameters", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        measured = "-" if row["measured_speedup"] is None else f"{row['measured_speedup']:.2f}x"
        interval = "-" if row.get("speedup_interval") is None else "{:.2f}-{:.2f}".format(*row["speedup_interval"])
        cells = [f"[{row['folder']}]({row['folder']}/)", f"{row['target']:g}x", measured, interval, row["status"],
                 f"{row['parameters']:,}", *(f"{(row.get('scores') or {}).get(key, float('nan')):.4g}" for key in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    command = f"\n```\n{metadata['command']}\n```\n" if metadata.get("command") else ""
    return (front_matter({**(metadata.get("source_card") or {}), "base_model": metadata.get("base_model"),
                          "tags": TAGS})
            + f"\n# {metadata.get('model', '?')}: a family of pruned models\n\nOne model per speedup target, each "
            f"timed as it ships: {timed_on(metadata)}.\n\n" + "\n".join(lines) + "\n" + command)


def write_cards(folder: str | Path) -> None:
    """README.md of the family and of every member, from the family's report (one an older version
    wrote, without the columns a card shows, gets none)."""
    folder = Path(folder)
    report = read_report(folder)
    rows, metadata = report["members"], report["metadata"]
    if missing := {column for row in rows for column in CARD_COLUMNS if column not in row}:
        log.warning("%s/report.json lacks %s: no model cards written (compress the family again for them)",
                    folder, ", ".join(sorted(missing)))
        return
    dense = next((row for row in rows if row["target"] == 1), None)
    for row in rows:
        atomic_write_text(folder / row["folder"] / CARD, member_card(folder / row["folder"], row, dense, metadata))
    atomic_write_text(folder / CARD, family_card(report))
