"""rl-plasticity: the runner, config, CLI and (later) probes, monitor and interventions.

See the README for the two commands that run a demo and the tests.
"""

__version__ = "0.1.0"
