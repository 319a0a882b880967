"""Independent registration validation: phantoms designed apart from `petct.synth`, and TRE measurement.

Nothing here imports `petct.phantom` or `petct.synth`: the shapes, values, grids and motions are our own second
design, so a registration tuned on the synthetic cohort is checked on anatomy it has never seen.
- `anatomy`: analytic shapes (ellipsoids, elliptic cylinders, shells) painted at arbitrary points.
- `sets`: validation sets (`head_pelvis`, `trunk`), each a seeded study generator with a ground-truth transform.
- `tre`: CT-only markers and target registration error of a found transform against the truth.
"""
