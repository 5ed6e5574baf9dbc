"""Loads this comp-vlm pruned model through transformers' Auto classes.

comp-vlm copied this file here when it saved the model; ``config.json``'s ``auto_map`` names :class:`CompVLMPruned`,
so ``AutoModel.from_pretrained(this_directory, trust_remote_code=True)`` (and a pipeline given
``trust_remote_code=True``) returns ``comp_vlm.load_pruned(this_directory)``: an ordinary transformers model with the
pruned shapes, the saved weights and the recipe's token sites. It needs the comp-vlm package installed.
"""

try:  # transformers' import check skips try blocks, so a missing comp-vlm gives the message below
    from comp_vlm.remote import load_from_auto_class
except ImportError as exc:
    raise ImportError(f"this directory holds a comp-vlm pruned model: loading it needs the comp-vlm package "
                      f"installed in this environment ({exc})") from None


class CompVLMPruned:
    """What ``auto_map`` names: its ``from_pretrained`` loads the directory with ``comp_vlm.load_pruned``."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to register: this class only loads."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return load_from_auto_class(pretrained_model_name_or_path, *model_args, **kwargs)
