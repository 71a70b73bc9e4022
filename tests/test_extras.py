"""An optional dependency that is missing names the extra that installs it."""

import sys

import pytest

from switchdit_dist.errors import UserError
from switchdit_dist.extras import need


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # an import of it now fails
    with pytest.raises(
        UserError, match=r"the digits data needs scikit-learn.*pip install 'switchdit-dist\[digits\]'"
    ):
        need("sklearn.datasets", "the digits data")
    assert need("json", "anything").dumps([]) == "[]"
