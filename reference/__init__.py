"""Reference client and daemon for the Docker client session protocol.

The sans-IO core (paths, filemode, diffcopy, tarstream) never touches sockets,
threads or grpc; transports in ``reference.transport`` adapt it to the wire.
"""
