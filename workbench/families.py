"""The component families by the name the CLI, the widgets and run configurations use."""

from workbench import attention, cache, decode, routers

FAMILIES = {"attention": attention, "cache": cache, "decoder": decode, "router": routers}
