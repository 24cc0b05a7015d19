"""The recipe app behind ``qsr-hf train``: runner, data and augmentation, models, image Trainer, model card.

Built on the library (`qsr_hf.frontends.callback`); the library never imports this package.
"""
