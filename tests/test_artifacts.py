"""esm.artifacts: the steering-tensor format shared by mine/ and library/, and its errors."""

from __future__ import annotations

import pytest
import torch

from esm_steer.esm import artifacts
from esm_steer.runs import RunError


@pytest.mark.parametrize(("stage_dir", "maker"), [(artifacts.MINE_DIR, "mine"), (artifacts.LIBRARY_DIR, "select")])
def test_steering_round_trip_prune_and_missing_file_names_its_stage(tmp_path, stage_dir, maker):
    root = tmp_path / "run3" / stage_dir
    v, k, s = torch.arange(3.0), torch.ones(3, dtype=torch.float64), torch.zeros(2, 3)
    for i in ("a", "b"):
        artifacts.save_steering(root, i, v, k, s)
    got = artifacts.load_steering(root, "a")
    assert torch.equal(got["vector"], v) and got["key"].dtype == torch.float32 and got["states"].shape == (2, 3)
    assert artifacts.steering_files(["a"]) == ["vectors/a.pt", "keys/a.pt"]
    artifacts.prune_steering(root, {"a"})
    assert sorted(p.name for p in root.rglob("*.pt")) == ["a.pt", "a.pt"]
    with pytest.raises(RunError, match=rf"missing .*{stage_dir}/vectors/b.pt \(made by esm-{maker}; "):
        artifacts.load_steering(root, "b")
    (root / "keys" / "a.pt").write_bytes(b"not a tensor file")
    with pytest.raises(RunError, match=rf"keys/a.pt: cannot be read .*esm-{maker} .*outputs.run_id=run3"):
        artifacts.load_steering(root, "a")
