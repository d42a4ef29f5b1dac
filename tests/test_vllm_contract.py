"""What the steering hook and the block-hash patch read from vLLM (engine/vllm_contract.py),
asserted against the installed vLLM's real classes and sources (no engine, no GPU). The same
source checks run on the newest release in ``make vllm-drift``; here they run on the unzipped
shape of a release built in the test (what a release that drops the V1 runner reports)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from esm_steer.engine import vllm_contract
from test_vllm_backend import need_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_root() -> Path:
    need_vllm()
    import vllm

    return Path(vllm.__file__).parent.parent


def test_installed_vllm_is_in_the_supported_range_and_its_sources_keep_the_contract(vllm_root):
    import vllm

    assert vllm_contract.version_problem(vllm.__version__) is None
    assert vllm_contract.check_source(vllm_root) == []


def test_runner_classes_the_hook_reads(vllm_root):
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert (GPUModelRunner.__module__, GPUModelRunner.__name__) == vllm_contract.V1_RUNNER
    assert vllm_contract.is_v1_runner(object.__new__(CPUModelRunner))  # the CPU runner is a V1 runner
    assert isinstance(InputBatch.req_ids, property)
    fields = {f.name for f in dataclasses.fields(CachedRequestState)}
    assert set(vllm_contract.REQUEST_ATTRS) <= fields
    init = inspect.getsource(GPUModelRunner.__init__)
    for attr in {a.split(".")[0] for a in vllm_contract.RUNNER_ATTRS}:
        assert f"self.{attr}" in init, attr
    assert "self.query_start_loc = self._make_buffer(" in init  # a CpuGpuBuffer: .cpu


def test_model_runner_v2_is_refused_by_class_and_by_attributes():
    """V2 keeps its per-step batch in locals: the start check names it, the hook finds nothing."""
    need_vllm()
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as V2

    from esm_steer.engine import vllm_steer

    v2 = object.__new__(V2)
    assert not vllm_contract.is_v1_runner(v2)
    msg = vllm_contract.runner_problem(v2, "0.32.0")
    assert "runs vllm.v1.worker.cpu.model_runner.CPUModelRunner, not the V1 model runner" in msg
    with pytest.raises(RuntimeError, match="has no requests, input_batch.req_ids, query_start_loc.cpu, positions"):
        vllm_steer._SteerHook(v2)(None, (), (None, None))


def test_the_hash_function_the_patch_wraps():
    need_vllm()
    from vllm.v1.core import kv_cache_utils as kcu

    from esm_steer.engine import vllm_steer

    vllm_steer.patch_block_hashing()
    fn = getattr(kcu, vllm_contract.HASH_FN)
    assert fn._esm_steer and vllm_steer.hashing_patched()
    orig = inspect.unwrap(fn)  # vLLM's own function
    assert orig is not fn and orig.__module__ == kcu.__name__ and orig.__name__ == vllm_contract.HASH_FN
    assert tuple(inspect.signature(orig).parameters) == vllm_contract.HASH_ARGS
    # the caller looks the name up in the module at call time, so wrapping the module attribute reaches it
    assert vllm_contract.HASH_FN in getattr(kcu, vllm_contract.HASH_CALLER).__code__.co_names


def test_sampling_params_fields_and_engine_args():
    need_vllm()
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    sp = SamplingParams(extra_args={"k": 1}, skip_reading_prefix_cache=True)
    assert sp.extra_args == {"k": 1} and sp.skip_reading_prefix_cache is True
    assert set(vllm_contract.SAMPLING_FIELDS) <= set(SamplingParams.__struct_fields__)
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"worker_extension_cls", "async_scheduling"} <= names


def test_plugin_entry_point_is_registered_and_loads():
    need_vllm()
    from importlib.metadata import entry_points

    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    from esm_steer.engine import vllm_plugin

    assert DEFAULT_PLUGINS_GROUP == vllm_contract.PLUGIN_GROUP
    (ep,) = [e for e in entry_points(group=vllm_contract.PLUGIN_GROUP) if e.name == vllm_contract.PLUGIN_NAME]
    assert ep.load() is vllm_plugin.register


def test_captures_survive_vllms_msgpack_utility_results():
    """collective_rpc's multiprocess path: a raw tensor comes back as an untyped list; the wire form
    (bytes with dtype and shape) comes back equal."""
    need_vllm()
    import torch
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult

    from esm_steer.engine import vllm_steer

    states, pos = torch.randn(300, 64), torch.arange(300)
    enc, dec = MsgpackEncoder(), MsgpackDecoder(UtilityResult)

    def roundtrip(obj):
        return dec.decode(enc.encode(UtilityResult(obj))).result

    raw = roundtrip([{"t": (pos, states)}])[0]["t"]
    assert not isinstance(raw[1], torch.Tensor)  # why the wire form exists
    (got,) = roundtrip([{"t": [vllm_steer.to_wire(pos), vllm_steer.to_wire(states)]}])
    p, h = (vllm_steer.from_wire(w) for w in got["t"])
    assert torch.equal(p, pos) and torch.equal(h, states)


def test_source_checks_report_what_a_release_without_the_v1_runner_breaks(vllm_root, tmp_path):
    """A copy of the installed sources with 0.34's changes: the V1 runner and input batch gone,
    the version 0.34.0: each break is one line naming the file."""
    import shutil

    root = tmp_path / "src"
    for rel in [
        "vllm/_version.py",
        "vllm/v1/utils.py",
        "vllm/v1/core/kv_cache_utils.py",
        "vllm/sampling_params.py",
        "vllm/plugins/__init__.py",
        "vllm/v1/engine/core.py",
        "vllm/v1/worker/worker_base.py",
        "vllm/envs.py",
        "vllm/engine/arg_utils.py",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(vllm_root / rel, root / rel)
    v = root / "vllm/_version.py"
    v.write_text(v.read_text().replace(vllm_contract.source_version(vllm_root), "0.34.0"))
    kv = root / "vllm/v1/core/kv_cache_utils.py"
    kv.write_text(kv.read_text().replace(f"= {vllm_contract.HASH_FN}(", "= _renamed("))
    got = vllm_contract.check_source(root)
    assert got == [
        "version 0.34.0 is outside vllm>=0.32,<0.34",
        "vllm/v1/worker/gpu_model_runner.py: no GPUModelRunner.__init__ (the V1 model runner the steering hook "
        "reads is gone)",
        "vllm/v1/worker/gpu_input_batch.py: InputBatch has no req_ids",
        "vllm/v1/worker/gpu_input_batch.py: CachedRequestState has no sampling_params",
        f"vllm/v1/core/kv_cache_utils.py: {vllm_contract.HASH_CALLER} no longer calls {vllm_contract.HASH_FN} by "
        "its module name (the patch would miss it)",
    ]
