r"""Helpers the experiments share, one concern per module, each imported only by the runs that
use it (a GMM run imports neither the digits, the judge nor diffusers):

* :mod:`~experiments.common.fit`: the one optimizer (:class:`~experiments.common.fit.CosineAdam`)
  and training loop (:func:`~experiments.common.fit.fit`) of every model the experiments train;
* :mod:`~experiments.common.plots`: the plots' style, loss curves and image grids;
* :mod:`~experiments.common.digits`: digit images as one dataset or one per class (VAE, DDPM);
* :mod:`~experiments.common.data`: the image files behind them (scikit-learn's digits, MNIST);
* :mod:`~experiments.common.judge`: a digits classifier and the Fréchet distance (DDPM).
"""
