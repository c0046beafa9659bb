"""synth written as a local lmms-eval task, scored by the same rule as the native evaluation.

The scorer and the native loop live in stages.common.evaluation.synth: the evaluation inside training (align, rl,
sft --eval-tasks synth) runs the same code, so its curves and a later `prism eval` measure the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.common.contract.samples import Sample

SYNTH_TASK = "prism_synth"
# Written beside the parquet at run time; the functions live in the package (absolute paths).
SYNTH_TASK_YAML = """\
# synth as a local lmms-eval task (written by prism eval; run with --include_path THIS_DIR)
task: prism_synth
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: prism_synth.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function stages.eval.lmms_tasks.utils.synth_doc_to_visual
doc_to_text: !function stages.eval.lmms_tasks.utils.synth_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
process_results: !function stages.eval.lmms_tasks.utils.process_prism_synth
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: format
    aggregation: mean
    higher_is_better: true
  - metric: caption_f1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lmms_task(directory: str | Path, samples: list[Sample], max_new_tokens: int) -> Path:
    """synth as a local lmms-eval task: prism_synth.parquet (images as an Image feature) + prism_synth.yaml."""
    import datasets

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "choices": datasets.Value("string"), "task": datasets.Value("string"),
                                  "meta": datasets.Value("string")})
    rows = {"id": [s.id for s in samples], "image": [{"bytes": s.images[0], "path": None} for s in samples],
            "question": [s.question for s in samples], "answer": [s.answer for s in samples],
            "choices": [json.dumps(s.choices) if s.choices else "" for s in samples],
            "task": [s.task for s in samples], "meta": [json.dumps(s.meta, sort_keys=True) for s in samples]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(directory / f"{SYNTH_TASK}.parquet"))
    (directory / f"{SYNTH_TASK}.yaml").write_text(SYNTH_TASK_YAML.format(max_new_tokens=int(max_new_tokens)))
    return directory
