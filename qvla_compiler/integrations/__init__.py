"""Adapters from other robot-learning libraries' policy objects to qvla_compiler's VLAPolicy protocol.

Importing this package imports none of those libraries; `qvla_compiler.integrations.lerobot` imports lerobot only
when a function that needs it is called.
"""
