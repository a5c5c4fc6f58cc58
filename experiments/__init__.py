"""The paper's experiments as commands: the plain/ResNet sweep and Table 6, the
training curves of Fig. 1, 4 and 6, the layer responses of Fig. 7.

    python -m experiments.sweep --dataset digits --depths 8,20,56 --seeds 0,1,2 \\
        --root runs/sweep_digits --figures          # runs, table6.md, fig6.png, fig7.png
    python -m experiments.table6 runs/sweep_digits
    python -m experiments.plot_curves runs/sweep_digits --out runs/sweep_digits/fig6.png
    python -m experiments.responses runs/sweep_digits --out runs/sweep_digits/fig7.png

Modules: :mod:`~experiments.sweep` (trains), :mod:`~experiments.table6`,
:mod:`~experiments.plot_curves`, :mod:`~experiments.responses` (analyse),
:mod:`~experiments.runs` (what they share). Training goes through
``resnet_jax.training`` unchanged; matplotlib is imported here only (the
library stays free of plotting).
"""
