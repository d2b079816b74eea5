"""``python -m corda_surgery`` (and ``torchrun … -m corda_surgery``): the same CLI as ``corda-surgery``."""

from corda_surgery.launcher import run

run()
