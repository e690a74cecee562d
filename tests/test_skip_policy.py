"""The skip policy (tests/helpers/skip_policy.py) on real pytest runs (pytester, in process): a skip for
a reason not on the allow-list fails the run, naming the test and the reason; an allowed one does not."""
import pytest
import torch

from tests.helpers import SHARED_DATA
from tests.helpers.skip_policy import NO_CUDA, NO_SHARED_DATA

pytest_plugins = ["pytester"]

CASES = {
    "not_allowed": "import pytest\ndef test_a(): pass\ndef test_b(): pytest.skip('optional thing missing')\n",
    "import_skip": "import pytest\nnothing = pytest.importorskip('no_such_module_xyz')\ndef test_a(): pass\n",
    "gpu": f"import pytest\n@pytest.mark.gpu\ndef test_a(): pytest.skip({NO_CUDA!r})\ndef test_b(): pass\n",
    "gpu_reason_unmarked": f"import pytest\ndef test_a(): pytest.skip({NO_CUDA!r})\n",
    "shared": f"import pytest\ndef test_a(): pytest.skip({NO_SHARED_DATA!r})\n",
    "plain": "def test_a(): pass\n",
}


@pytest.mark.parametrize("case, allowed", [
    ("not_allowed", False), ("import_skip", False), ("plain", True), ("gpu_reason_unmarked", False),
    ("gpu", not torch.cuda.is_available()),  # on a CUDA machine a gpu test must run, not skip
    ("shared", not SHARED_DATA.is_dir()),  # allowed only where ../shared/data is truly absent
])
def test_only_allowed_skips_pass(pytester, case, allowed):
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(**{f"test_case_{case}": CASES[case]})  # no clash with a real test module's name
    r = pytester.runpytest_inprocess("-p", "tests.helpers.skip_policy", "-p", "no:cacheprovider")
    out = r.stdout.str()
    assert r.ret == (0 if allowed else 1), out
    assert ("SKIP NOT ALLOWED" in out) == (not allowed), out
    if case == "not_allowed":
        assert "SKIP NOT ALLOWED test_case_not_allowed.py::test_b: optional thing missing" in out, out
        r.assert_outcomes(passed=1, skipped=1)
    if case == "import_skip":
        assert "could not import 'no_such_module_xyz'" in out, out
