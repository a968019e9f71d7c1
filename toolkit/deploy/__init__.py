"""Deployment: board bundles, provisioning over serial (flash), the serial-to-MQTT gateway."""
