"""``ops/_config.check_interpreter_versions``: Triton < 3.7's interpreter next to NumPy >= 2.4 is refused with
a message naming both versions and the fix; every other pair passes. (CI runs the kernel tests with both
Triton 3.6 + NumPy < 2.4 and the latest Triton, see ``.ci/run``.)"""

from __future__ import annotations

import pytest

from tisdpo_kernels.ops._config import check_interpreter_versions


@pytest.mark.parametrize("triton_version,numpy_version", [("3.6.0", "2.4.6"), ("3.5.1", "2.5.0rc1"), ("2.3.1", "3.0")])
def test_old_interpreter_with_new_numpy_is_refused(triton_version, numpy_version):
    expected = rf"triton {triton_version} cannot run with numpy {numpy_version}.*numpy<2\.4"
    with pytest.raises(RuntimeError, match=expected):
        check_interpreter_versions(triton_version, numpy_version)


@pytest.mark.parametrize("triton_version,numpy_version",
                         [("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.4.6"), ("3.10.0+git1", "2.4.0"),
                          ("4.0.0", "1.26.4")])
def test_other_version_pairs_pass(triton_version, numpy_version):
    check_interpreter_versions(triton_version, numpy_version)
