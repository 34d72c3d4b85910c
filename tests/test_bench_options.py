import argparse

import pytest

from segdist.bench.options import require_positive
from segdist.errors import UserError


def test_the_first_option_below_one_is_named_as_typed():
    args = argparse.Namespace(rounds=3, batch_size=0, block=-1)
    require_positive(args, "rounds")
    with pytest.raises(UserError, match=r"^--batch-size must be >= 1, got 0$"):
        require_positive(args, "rounds", "batch_size", "block")
