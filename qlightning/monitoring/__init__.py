from qlightning.monitoring.qparam_monitor import QParamMonitor

__all__ = ["QParamMonitor"]
