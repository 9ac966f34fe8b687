"""Flow math as small pure functions, one concept per module.

The one time convention of this project, used everywhere:

    t = 0 is noise x0 ~ N(0, I), t = 1 is data x1,   x_t = t * x1 + (1 - t) * x0,
    velocity v = dx_t/dt, whose rectified-flow target is x1 - x0.

Rectified-flow UNets (ours and the released InstaFlow / 2-RF weights) are fed the timestep
``1000 * (1 - t)``, so the one-step model is called once at timestep 1000.

Diffusion teachers (DDPM, epsilon- or v-prediction) live on ``x_s = sqrt(ab) x1 + sqrt(1-ab) eps``.
Dividing by ``sqrt(ab) + sqrt(1-ab)`` maps that exactly onto our interpolation with ``x0 = eps``
and ``t = sqrt(ab) / (sqrt(ab) + sqrt(1-ab))``, which is how a teacher becomes a velocity field
(``diffusion`` and ``velocity``).

A solver's *path* is the list of its states ``[(t, x_t), ...]`` in flow time, x0 first: the one
trajectory format (``solvers`` write it, ``straightness`` reads it).

Modules: ``paths``, ``time_sampling``, ``guidance``, ``solvers``, ``diffusion``, ``velocity``,
``noise``, ``straightness``, ``losses``, ``schedules``. This package imports torch (and diffusers'
DPM-Solver++ scheduler, lazily) and nothing else of the project.
"""
