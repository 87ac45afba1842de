"""Reference device agent for the otaflow MQTT contract v1, and a fleet simulator.

It imports only the protocol, manifest, identifier and error modules of
``otaflow``, never server code, so a third-party agent can follow it. The
command line also imports ``otaflow.uboot``, which fetches the U-Boot images
that lab devices start with. Start with ``Fleet`` and ``FleetConfig`` in
``device_sim.fleet``, or run ``python -m device_sim --help``.
"""
