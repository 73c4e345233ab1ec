"""A TCP forwarder on 127.0.0.1 (test helper): ``python tests/tcpproxy.py LISTEN_PORT TARGET_PORT``.

Killing it cuts every connection and refuses new ones (a storage outage); starting it again on the same
port ends the outage, while the server behind it keeps its state.
"""
import asyncio
import sys


async def _pipe(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _handle(client_reader, client_writer, target: int):
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))


async def _main(listen: int, target: int):
    server = await asyncio.start_server(lambda r, w: _handle(r, w, target), "127.0.0.1", listen,
                                        reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2])))
