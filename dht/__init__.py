"""swarmllm dht: the swarm directory.

Files:
- records.py    the record schema (versioned, strict, tolerant of unknown extras); pure, no I/O
- identity.py   Ed25519 identity: the libp2p peer id and the key that signs the peer's records
- validator.py  hivemind record validator: a peer record must be signed by the peer id it names
- directory.py  every DHT read and write for our keys, and starting a DHT node (DHTDied: its process is gone)
- node.py       Node: a p2pd owned by this process and a DHT process over it, restarted when it dies
- bootstrap.py  `swarmllm dht` / `python -m dht`: a bootstrap node
- ready.py      the readiness line and maddr file every long-running command writes
- addressing.py multiaddrs as the go-libp2p daemon wants them (dialing a peer by its announced addresses)
- __main__.py   `python -m dht`: the bootstrap node
"""
