"""SPELL Sampler's KSampler part goes through comfy.sample.sample, not ComfyUI's core node module."""
import torch

import shield_harness as h


def test_inputs_match_the_host_ksampler(comfy_nodes, pack):
    core = h.pack_submodule("nodes.ksampler_core")
    host = comfy_nodes.KSampler.INPUT_TYPES()["required"]
    ours = core.ksampler_inputs()
    assert list(ours) == list(host)                    # same widgets, same order: saved workflows keep their values
    for name, (kind, opts) in ours.items():
        host_kind, host_opts = host[name]
        assert kind == host_kind, name
        for key in ("default", "min", "max", "step", "control_after_generate"):
            assert opts.get(key) == host_opts.get(key), (name, key)


def test_sampling_equals_common_ksampler_with_mask_and_batch_index(comfy_nodes, pack, tiny_model):
    core = h.pack_submodule("nodes.ksampler_core")
    latent = {"samples": torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
              "batch_index": [3, 5], "noise_mask": torch.ones(1, 1, 4, 4).tril()}
    args = (tiny_model, 11, 4, 5.0, "euler", "normal", h.conditioning(1), h.conditioning(2))
    ours = core.sample_latent(*args, latent, denoise=0.8)
    host = comfy_nodes.common_ksampler(*args, latent, denoise=0.8)[0]
    assert torch.equal(ours["samples"], host["samples"])
    assert ours["batch_index"] == [3, 5] and ours["noise_mask"] is latent["noise_mask"]


def test_spell_nodes_do_not_import_the_core_node_module():
    source = (h.PACK_ROOT / "nodes" / "spell_nodes.py").read_text()
    assert "import nodes" not in source and "common_ksampler(" not in source
