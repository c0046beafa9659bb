"""sft --compile: the policy's text decoder layers under torch.compile give the eager loss and gradients, with
one graph for every layer and every padded length (no recompile per step)."""

import json

import pytest
import torch

from stages.common.contract.config import resolve
from stages.common.contract.errors import PrismError
from stages.common.contract.samples import Sample
from stages.common.models.loading import (
    compile_decoder_layers,
    load_policy,
    load_processor,
)
from stages.common.world import synth
from stages.sft.config import SFTConfig
from stages.sft.data import encode_sample, pad, rope_index_of
from stages.sft.loss import summed_nll


def test_compile_is_off_by_default_and_settable():
    assert resolve(SFTConfig).compile is False
    assert resolve(SFTConfig, sets=["compile=true"]).compile is True


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(PrismError, match="no text decoder layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def _batches(model, processor):
    """Two padded SFT batches of different lengths (what a run's steps feed the layers)."""
    samples = [Sample(**{**s.__dict__, "teacher": synth.oracle_demo(s)}) for s in synth.load("synth:train:6")]
    items = sorted((encode_sample(s, processor, rope_index_of(model), max_length=4096) for s in samples),
                   key=lambda e: e.n_tokens)
    pad_id = processor.tokenizer.pad_token_id
    batches = [pad(items[:3], pad_id), pad(items[3:], pad_id)]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    return batches


def _loss_and_grads(model, batch):
    model.zero_grad()
    nll, n = summed_nll(model, batch)
    (nll / n).backward()
    return nll.detach() / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_path):
    """Tolerance: inductor fuses the layers' elementwise ops (RMSNorm, SiLU gate, rotary) and may reorder
    their fp32 reductions, so results differ from eager by rounding only: at most 6e-7 on a loss of ~6.7 (1e-7
    relative) over 23 training steps (benchmarks/compile_probe.py). rtol 1e-5 leaves a hundredfold margin; a
    wrong kernel (a dropped norm, a wrong rotary position) moves the loss by far more. Gradients: within 1e-4
    of the largest gradient entry (checked by hand, under gradient checkpointing: 1.5e-7 absolute)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = load_policy("tiny")
    compiled = load_policy("tiny", compile_layers=True)
    processor = load_processor("tiny")
    layers = compiled.get_decoder().layers
    assert len(layers) == compiled.config.get_text_config().num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    graphs_before = counters["stats"]["unique_graphs"]
    for batch in _batches(eager, processor):
        want_loss, want_grads = _loss_and_grads(eager, batch)
        got_loss, got_grads = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0.0)
        assert got_grads.keys() == want_grads.keys()
        scale = max(float(g.abs().max()) for g in want_grads.values())
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=0.0, atol=1e-4 * scale, msg=name)
    # the layers really ran compiled, and one shape-generic graph served all four layers and both lengths
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_sft_stage_with_compile_trains_like_eager(tmp_path, tiny_path):
    """The stage wires the option: `sft --compile` logs the eager run's losses step for step (the same data
    order and seed), within the rounding tolerance above; and its saved weights have the eager run's names
    (a layer compiled in place keeps its parameter names)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from stages.sft.run import run
    from tests.conftest import run_stage

    flags = dict(ckpt="tiny", data=["synth:train:64"], eval_fraction=0.0, batch_size=8, micro_batch_size=8,
                 max_steps=3, lr=1e-4, save_every=1000, eval_every=1000, seed=0)

    torch._dynamo.reset()
    runs, graphs = {}, {}
    for name in ("eager", "compiled"):
        before = counters["stats"]["unique_graphs"]
        runs[name] = run_stage(SFTConfig, run, out=str(tmp_path / name), compile=(name == "compiled"), **flags)
        graphs[name] = counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert graphs == {"eager": 0, "compiled": 1}    # the option reached the model, and nothing recompiled
    losses = {name: [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]
              for name, path in runs.items()}
    assert len(losses["eager"]) == 3
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=0.0)
    saved = {name: load_file(path / "model" / "model.safetensors") for name, path in runs.items()}
    assert saved["compiled"].keys() == saved["eager"].keys()
