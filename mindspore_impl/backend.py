"""The MindSpore backend as the core sees it (entry point `mindspore` of telechat_ascend.backends). Imports no
framework."""

from telechat_ascend.backends import Backend

BACKEND = Backend(name="mindspore", extra="mindspore", inference="mindspore_impl.inference",
                  trainer=("-m", "mindspore_impl.train"))
