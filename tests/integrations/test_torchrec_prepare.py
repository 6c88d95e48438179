"""fsc.integrations.torchrec refuses what its fixes were not written for, with the cause
(runs with or without TorchRec installed)."""

from __future__ import annotations

import sys

import pytest
import torch

import fsc
import fsc.integrations.torchrec as fsc_torchrec


def test_missing_torchrec_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # import torchrec now raises ImportError
    with pytest.raises(fsc_torchrec.TorchRecError, match=r"needs torchrec and fbgemm_gpu .*torchrec==1\.8\.0"):
        fsc_torchrec.prepare()


def test_unsupported_versions_are_refused_before_anything_is_patched(monkeypatch):
    monkeypatch.setattr(fsc_torchrec, "_versions", lambda: {"torchrec": "1.9.0", "fbgemm_gpu": "1.8.0"})
    before = fsc_torchrec.applied_fixes()
    with pytest.raises(fsc_torchrec.TorchRecError, match=r"supports .*'torchrec': '1\.8\.0'.*found .*'1\.9\.0'"):
        fsc_torchrec.prepare()
    assert fsc_torchrec.applied_fixes() == before
    assert issubclass(fsc_torchrec.TorchRecError, fsc.FscError)


def test_prepare_applies_each_fix_once():
    pytest.importorskip("torchrec", reason="needs torchrec==1.8.0 and fbgemm-gpu-cpu==1.8.0 (make test installs them)")
    # prepare() sets TorchRec's Dynamo settings for the process: restored after this test
    with torch._dynamo.config.patch(**{k: getattr(torch._dynamo.config, k) for k in fsc_torchrec.DYNAMO_SETTINGS}):
        first = fsc_torchrec.prepare()
        assert torch._dynamo.config.skip_torchrec is False
        assert fsc_torchrec.prepare() == []  # every fix now finds itself applied
    assert set(first) <= {f.name for f in fsc_torchrec.FIXES}
    assert {f.name for f in fsc_torchrec.FIXES} <= set(fsc_torchrec.applied_fixes())
