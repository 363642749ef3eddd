"""Rollouts: the planner (pure: a view of a rollout and ``now`` in, a decision out), the controller that
persists its decisions before acting on them, and the job publisher that reaches devices."""
