"""Redis addresses of the settings: Feast's connection string and a client, from one parser.

``online_store.redis_url`` (and ``stream.url``) is ``host:port[,db=N,password=…]``
(Feast's form) or ``redis://[:password@]host:port/db``. The Feast plugin gets
:func:`redis_connection_string` of it; the streaming tiles and the event stream
get a client from :func:`connect`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import redis

__all__ = ["connect", "redis_connection_string"]


def redis_connection_string(url: str) -> str:
    """Turn ``redis://host:port/db`` (or Feast's ``host:port,db=N``) into Feast's form.

    Examples
    --------
    >>> redis_connection_string("redis://cache:6380/2")
    'cache:6380,db=2'
    >>> redis_connection_string("localhost:6379")
    'localhost:6379'
    """
    if "://" not in url:
        return url
    parsed = urlparse(url)
    text = f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}"
    db = parsed.path.strip("/")
    if db:
        text += f",db={db}"
    if parsed.password:
        text += f",password={parsed.password}"
    if parsed.scheme == "rediss":
        text += ",ssl=true"
    return text


def connect(url: str, timeout: float | None = None) -> redis.Redis:
    """A client for ``redis://host:port/db``, or the online store's ``host:port[,db=N,…]``.

    Examples
    --------
    >>> connect("localhost:6380,db=2").connection_pool.connection_kwargs["db"]
    2
    """
    import redis  # the optional "redis" extra: only a Redis deployment needs it

    if "://" in url:
        parsed = urlparse(url)
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis url {url!r}: expected redis://, rediss:// or host:port")
        return client
    address, *options = url.split(",")
    host, _, port = address.partition(":")
    kwargs: dict[str, Any] = {"host": host or "localhost", "port": int(port or 6379)}
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip()
        if key == "db":
            kwargs["db"] = int(value)
        elif key == "password":
            kwargs["password"] = value
        elif key == "ssl":
            kwargs["ssl"] = value.strip().lower() == "true"
        elif key == "username":
            kwargs["username"] = value
        else:
            raise ValueError(f"redis url {url!r}: unknown option {key!r}")
    return redis.Redis(**kwargs, socket_timeout=timeout, socket_connect_timeout=timeout)
