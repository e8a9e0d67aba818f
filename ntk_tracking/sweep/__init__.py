"""Sweeps: a grid of training runs recorded as one MLflow parent run with a child run per point.

    ntk-tracking sweep --task mnist_dense --widths 16,64,256 --depths 1,2,4 --activations relu,tanh
    ntk-tracking sweep --widths 16,64 --depths 1,2 --executor ray --ray-address auto --cpus-per-run 2
    mlflow run . -e sweep --env-manager local -P widths=16,64 -P depths=1,2 -P epochs=5

Each child is a normal tracked training run. The sweep hands it its task config, never a command
line: the config is written as config.json next to the child's log and a subprocess runs
`python -m ntk_tracking.run --config config.json` (ntk_tracking/run.py) with MLFLOW_RUN_ID set to the
child, so it writes config.json, per-epoch metrics and CV checkpoints exactly as `ntk-tracking train`
does, and resumes from its resume checkpoint when relaunched.
Children are created up front with a stable key tag; relaunching the sweep with the parent's id
skips FINISHED children and reruns (resumes) the others. The subprocess runs on this machine
(`--executor local`, the default) or inside a Ray task on a cluster (`--executor ray`).

Modules: spec (the grid, each point's config), plan (checks before any run exists), run (parent
run, children, local executor), analysis; the Ray executor is ntk_tracking.on_ray, the command
line ntk_tracking/cli/sweep.py.
"""

from ntk_tracking.sweep.analysis import analyze_sweep
from ntk_tracking.sweep.plan import SweepPlan, find_children, is_sweep_run, plan_sweep
from ntk_tracking.sweep.run import ChildResult, SweepResult, execute_sweep, print_summary, run_sweep
from ntk_tracking.sweep.spec import GRID, GRID_DEFAULTS, SPEC_ARTIFACT, SweepSpec, child_key

__all__ = ["GRID", "GRID_DEFAULTS", "SPEC_ARTIFACT", "ChildResult", "SweepPlan", "SweepResult", "SweepSpec", "analyze_sweep", "child_key", "execute_sweep",
           "find_children", "is_sweep_run", "plan_sweep", "print_summary", "run_sweep"]
