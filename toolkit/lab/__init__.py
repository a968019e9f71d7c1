"""The lab: embedded and Mosquitto brokers, the process launcher, the demo and the benchmark."""
