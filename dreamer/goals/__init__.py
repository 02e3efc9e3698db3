"""Dream-based goal achievement, an extension of plain DreamerV3: ``GoalDreamer`` (``agent.py``)
adds the goal state model (``model.py``), the goal matcher (``matcher.py``), goal pursuit while
acting (``pursuit.py``, with its metrics in ``metrics.py``) and the goal spaces (``space.py``) to
``dreamer.agent.Dreamer``; the dream callbacks (``callbacks/dreams.py``) train and measure them."""

from dreamer.goals.agent import GoalDreamer, GoalKnobs

__all__ = ["GoalDreamer", "GoalKnobs"]
