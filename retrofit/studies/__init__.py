"""The papers' claims measured with retrofit itself: one module per study, each a :class:`Study`."""

from __future__ import annotations

from retrofit.studies.base import Study
from retrofit.studies.block_tradeoff import BlockTradeoff
from retrofit.studies.convergence import Convergence
from retrofit.studies.from_scratch import FromScratch
from retrofit.studies.schedules import Schedules

STUDIES: dict[str, Study] = {study.name: study for study in (Convergence(), Schedules(), BlockTradeoff(), FromScratch())}
