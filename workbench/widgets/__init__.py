"""ipywidgets panels over the generation loop: `Workbench(model)` picks components, runs, and plots live.

    import workbench as wb
    wb.Workbench(wb.load())

Importing this package imports ipywidgets and HoloViews; `import workbench` alone does not.
"""

from workbench.widgets.configuration import Configuration
from workbench.widgets.controls import control_for, value_of
from workbench.widgets.live import LivePlots, Throttle
from workbench.widgets.panel import Workbench
from workbench.widgets.picker import ComponentPicker

__all__ = ["Workbench", "ComponentPicker", "Configuration", "LivePlots", "Throttle", "control_for", "value_of"]
