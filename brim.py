"""brim: a pre-fork server launcher for Python, in one file.

``python3 brim.py start`` reads an INI configuration, binds the listening
sockets, daemonizes with a pid file, forks worker processes (dropping
privileges in them) and keeps them alive.  Workers serve WSGI app chains,
raw TCP connections or UDP datagrams; background daemons run supervised
beside them.  Workers share counters through shared memory.

The file reads top to bottom in the order data flows, one banner a
section:

    Configuration           Conf and reading files; the table of brim's
                            options (_OPTIONS) and the settings read from
                            it; ``call = dotted.Name`` (a brim app class)
                            and ``call = module:app`` (a plain WSGI app,
                            or a factory of one)
    Logging                 NOTICE level, txn-stamped lines (text or
                            JSON), syslog or a file reopened on SIGUSR1
    Stats                   the shared memory (_StatsLayout): a bucket per
                            worker, its heartbeat, one reading for every
                            view (JSON, Prometheus, status)
    Statsd                  requests, durations and restarts as statsd
                            lines over UDP, batched, never waiting
    Listening sockets       binding with retry, handing them to a new
                            brimd, taking them from systemd (LISTEN_FDS)
    The HTTP/WSGI path      a strict, lean HTTP/1.1 parser and WSGI
                            gateway; the threads that take turns to serve
                            (_ConnectionPool)
    Subservers              [wsgi], [tcp], [udp] and [daemons]: what a
                            worker process runs
    Apps that ship with brim  WSGIEcho, WSGIStats, WSGIHealth, TCPEcho,
                            UDPEcho, DaemonSample
    brim.http               responses that are exceptions and WSGI apps
    brim.httpform           multipart/form-data, streamed
    WSGIFS                  files from a directory
    WSGIBasicAuth           HTTP Basic authentication
    Supervision             Server, the main process: its signals; its
                            workers kept alive (_Supervisor) and scaled
                            (_Scaler, _Autoscaler), its control socket,
                            its restarts in place (also on a code change:
                            --reload), systemd notify
    Command line            main(): serve, start, stop, shutdown, restart,
                            status, check, foreground, hash-password, ...;
                            and serve(app) for projects that vendor brim.py
    brim top                a live view of a running brimd in the
                            terminal: workers, requests a second, CPU, RSS
    The stats page          the HTML and script WSGIStats answers a
                            browser

Everything is standard library.  Names without a leading underscore are the
ones configs and apps use.
"""

import os
import sys


def _run_as_an_import():
    """Run as ``python3 brim.py``, go on as ``import brim`` would.

    CPython keeps the syntax tree of a script until the script ends (for
    brim.py about 10 MB), and every worker would inherit it; an imported
    module keeps none.  So the script hands the code it was compiled to,
    in a memory file, to a fresh interpreter in this same process (exec:
    same pid, arguments and interpreter options), which runs it as the
    module ``brim`` (no second compile), then _resume_script().  Where
    there is no memfd_create, brim.py runs on as a script.
    """
    import marshal
    try:
        fd = os.memfd_create('brim.py', 0)
    except (AttributeError, OSError):
        return
    os.set_inheritable(fd, True)
    code = marshal.dumps(sys._getframe(1).f_code)
    size = len(code)
    while code:
        code = code[os.write(fd, code):]
    argv = getattr(sys, 'orig_argv', [])        # Python 3.10 and later
    options = argv[1:argv.index(sys.argv[0])] if sys.argv[0] in argv else []
    boot = ("import marshal,os,sys,types;b=sys.modules['brim']=types."
            "ModuleType('brim');exec(marshal.loads(os.pread(%d,%d,0)),"
            "vars(b));b._resume_script(%d)" % (fd, size, fd))
    os.execv(sys.executable, [sys.executable] + options + [
        '-c', boot, os.path.abspath(sys.argv[0])] + sys.argv[1:])


def _resume_script(fd):
    """The module brim, run by _run_as_an_import(): carry on as the script,
    with its sys.argv and sys.path."""
    os.close(fd)
    del sys.argv[0]     # '-c'
    globals()['__file__'] = sys.argv[0]
    if sys.path[:1] == ['']:
        sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
    sys.exit(main())


if __name__ == '__main__' and __spec__ is None and not sys.flags.interactive:
    _run_as_an_import()

import base64   # noqa: E402  (above: before the time these take)
import collections
import configparser
import ctypes
import errno
import faulthandler
import gc
import glob
import hashlib
import hmac
import html
import importlib
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import mimetypes
import multiprocessing
import random
import re
import select
import signal
import socket
import stat
import string
import struct
import sysconfig
import threading
import time
import traceback
import types
from stat import S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from urllib.parse import parse_qs, quote, unquote_to_bytes

__version__ = '1.0.0'

#: Where brimd looks for configuration when no ``-c`` is given.
DEFAULT_CONF_FILES = ('/etc/brimd.conf', '~/.brimd.conf')


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

class ConfError(Exception):
    """A configuration problem; its text is the one line brimd prints."""


_TRUE_VALUES = frozenset(('1', 'on', 't', 'true', 'y', 'yes'))
_FALSE_VALUES = frozenset(('0', 'off', 'f', 'false', 'n', 'no'))


class Conf(object):
    """The parsed configuration: ``store[section][option]`` strings.

    ``files`` lists the files that were read, in order.  The typed getters
    raise ConfError naming the section and option when a value does not
    convert, so a bad value stops the start with one clear line.
    """

    def __init__(self, store, files=None, defaults=None):
        self.store = store
        self.files = list(files or [])
        #: ``[DEFAULT]``'s options, which configparser copies into every
        #: section: they are not the section's own.
        self.defaults = dict(defaults or {})

    def get(self, section, option, default=None):
        """The raw string value, or ``default`` when not set."""
        return self.store.get(section, {}).get(option, default)

    def get_bool(self, section, option, default):
        return self._convert(section, option, default, _bool)

    def get_int(self, section, option, default):
        return self._convert(section, option, default, _int)

    def get_float(self, section, option, default):
        return self._convert(section, option, default, _float)

    def get_path(self, section, option, default=None):
        """A path with ``~`` expanded, or ``default``."""
        return self._convert(section, option, default, _path)

    def _convert(self, section, option, default, convert):
        value = self.get(section, option)
        if value is None:
            return default
        return convert(section, option, value)

    def error(self, section, option, value, type_name):
        """The ConfError for a value that cannot be converted."""
        return _cannot_convert(section, option, value, type_name)

    def sections(self):
        return list(self.store)

    def own_options(self, section):
        """The options set in ``[section]`` itself, not from [DEFAULT] (an
        option set to [DEFAULT]'s value changes nothing, so counts as
        [DEFAULT]'s)."""
        return [option for option, value in self.store.get(section, {}).items()
                if self.defaults.get(option) != value]


def _cannot_convert(section, option, value, type_name):
    return ConfError(
        'Configuration value [%s] %s of %r cannot be converted to %s.'
        % (section, option, value, type_name))


def read_conf(paths, explicit=False):
    """Read ``paths`` (and their ``additional_confs``) into a Conf.

    Missing default files are skipped; a file named with ``-c`` that
    cannot be read is an error.  Interpolation is off, so ``%`` is plain.
    """
    parser = configparser.RawConfigParser()
    read = []
    pending = [os.path.expanduser(p) for p in paths]
    looked_for = list(pending)
    while pending:
        path = pending.pop(0)
        if path in read:
            continue
        if not os.path.exists(path):
            if explicit:
                raise ConfError('Configuration file %s was not found.' % path)
            continue
        try:
            with open(path, encoding='utf-8') as fp:
                parser.read_file(fp, path)
        except (OSError, UnicodeDecodeError, configparser.Error) as err:
            raise ConfError('Could not read configuration file %s: %s'
                            % (path, _one_line(err)))
        read.append(path)
        extra = parser.get('brim', 'additional_confs', fallback='')
        pending.extend(os.path.expanduser(p) for p in extra.split()
                       if os.path.expanduser(p) not in read)
        explicit = True     # files a config names must exist
    if not read:
        raise ConfError('No configuration found: there is no %s; name a '
                        'file with -c CONF.' % ' or '.join(looked_for))
    store = {section: dict(parser.items(section))
             for section in parser.sections()}
    return Conf(store, read, parser.defaults())


def _one_line(err):
    """An exception's text folded onto one line."""
    text = str(err) or err.__class__.__name__
    return ' '.join(text.split())


# -- brim's own options -----------------------------------------------------
#
# Every option brim reads from its own sections is in _OPTIONS, and
# _read_settings is the one reader: it refuses what brim does not know,
# converts and checks each value, and hands back immutable settings.  A
# converter takes (section, option, text) and raises ConfError naming
# both.  (read_conf reads additional_confs itself: it needs the files
# named before there is a configuration to read settings from.)

def _text(section, option, text):
    return text


def _path(section, option, text):
    return os.path.expanduser(text.strip())


def _int(section, option, text):
    try:
        return int(text)
    except ValueError:
        raise _cannot_convert(section, option, text, 'int')


def _float(section, option, text):
    try:
        return float(text)
    except ValueError:
        raise _cannot_convert(section, option, text, 'float')


def _bool(section, option, text):
    lowered = text.strip().lower()
    if lowered in _TRUE_VALUES:
        return True
    if lowered in _FALSE_VALUES:
        return False
    raise _cannot_convert(section, option, text, 'boolean')


def _words(section, option, text):
    return tuple(text.split())


def _paths(section, option, text):
    return tuple(os.path.expanduser(path) for path in text.split())


def _directories(section, option, text):
    """Comma-separated, as pythonpath is (a path may hold spaces)."""
    return tuple(path.strip() for path in text.split(',') if path.strip())


def _ints(section, option, text):
    try:
        return tuple(int(word) for word in text.split())
    except ValueError:
        raise _cannot_convert(section, option, text, 'a list of ints')


def _octal(section, option, text):
    try:
        return int(text, 8)
    except ValueError:
        raise _cannot_convert(section, option, text, 'an octal mask')


def _at_least(least):
    """The converter of an int that may not go below ``least``."""
    def convert(section, option, text):
        value = _int(section, option, text)
        if value < least:
            raise ConfError('[%s] %s must be at least %d.'
                            % (section, option, least))
        return value
    return convert


class _WorkerCount(collections.namedtuple('_WorkerCount', 'least most')):
    """``workers``: a count (least == most), or a range ``2..8`` within
    which brimd adds and retires workers by how busy they are."""

    @property
    def adaptive(self):
        return self.least < self.most

    def __str__(self):
        return ('%d..%d' % self if self.adaptive else str(self.least))


def _workers(section, option, text):
    least, dots, most = text.strip().partition('..')
    count = _WorkerCount(_at_least(1)(section, option, least),
                         _at_least(1)(section, option, most) if dots
                         else None)
    if count.most is None:
        return count._replace(most=count.least)
    if count.most < count.least:
        raise ConfError('[%s] workers = %s: the range must go up (%d..%d).'
                        % (section, text.strip(), count.most, count.least))
    return count


def _port(section, option, text):
    value = _int(section, option, text)
    if not 0 <= value <= 65535:
        raise ConfError('[%s] port %d is not between 0 and 65535.'
                        % (section, value))
    return value


def _at_least_seconds(section, option, text):
    value = _float(section, option, text)
    if not value >= 0:     # nan too
        raise ConfError('[%s] %s must be 0 or more seconds, not %r.'
                        % (section, option, text))
    return value


def _worker_timeout(section, option, text):
    value = _float(section, option, text)
    if value and value < 2:
        raise ConfError('[%s] worker_timeout must be 0 (off) or at least '
                        '2 seconds: workers beat once a second.' % section)
    return value


def _log_level(section, option, text):
    _log_level_number(section, text)
    return text


def _log_facility(section, option, text):
    _log_facility_number(section, text)
    return text


def _log_format(section, option, text):
    if text not in ('text', 'json'):
        raise ConfError('[%s] log_format %r is not text or json.'
                        % (section, text))
    return text


def _peers(section, option, text):
    """Comma- or space-separated addresses and CIDR ranges; ``*`` is any
    peer.  The networks, for _trusted_peer()."""
    networks = []
    for word in text.replace(',', ' ').split():
        if word == '*':
            word = '0.0.0.0/0 ::/0'
        for entry in word.split():
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfError('[%s] %s: %r is not an address or a CIDR '
                                'range.' % (section, option, entry))
    return tuple(networks)


def _show_peers(networks):
    return ','.join(str(net.network_address) if net.num_addresses == 1
                    else str(net) for net in networks)


def _host_port(section, option, text):
    """``host:port``, an IPv6 address in brackets (``[::1]:8125``): the
    (host, port) to send to."""
    host, colon, port = text.strip().rpartition(':')
    bracketed = host.startswith('[') and host.endswith(']')
    if bracketed:
        host = host[1:-1]
    if (not colon or not host or not port.isdigit() or
            not 0 < int(port) < 65536 or (':' in host) != bracketed):
        raise ConfError('[%s] %s %r is not host:port; write it as '
                        '127.0.0.1:8125 (an IPv6 address as [::1]:8125).'
                        % (section, option, text))
    return host, int(port)


def _show_host_port(value):
    if value is None:
        return _show(value)
    return ('[%s]:%d' if ':' in value[0] else '%s:%d') % value


def _statsd_prefix(section, option, text):
    """A prefix statsd lines can carry: no spaces, ``:`` or ``|``."""
    if not re.match(r'^[A-Za-z0-9_.-]+$', text.strip()):
        raise ConfError('[%s] %s %r: use letters, digits, _, - and . only '
                        '(myapp, or myapp.web).' % (section, option, text))
    return text.strip()


def _show(value):
    """A setting as ``check`` prints it."""
    if value is None or value == ():
        return '(not set)'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return '%g' % value
    if isinstance(value, tuple):
        return ' '.join(str(item) for item in value)
    return str(value)


class _Option(object):
    """One of brim's options: its name, the kinds of section it belongs to
    ('brim', 'wsgi', 'tcp', 'udp', 'daemons'), its converter, its default,
    and whether ``[brim]`` may give the default for those sections.  An
    ``ignored`` one is the original brimd's, accepted so its configurations
    run unchanged."""

    def __init__(self, name, kinds, convert, default, from_brim=False,
                 show=_show, ignored=False):
        self.name = name
        self.kinds = frozenset(kinds.split())
        self.convert = convert
        self.default = default
        self.from_brim = from_brim
        self.show = show
        self.ignored = ignored

    def allowed_in(self, kind):
        return kind in self.kinds or (kind == 'brim' and self.from_brim)


_EVERY_KIND = 'brim wsgi tcp udp daemons'
_SUBSERVERS = 'wsgi tcp udp daemons'
_LISTENERS = 'wsgi tcp udp'

_OPTIONS = (
    _Option('additional_confs', 'brim', _words, ()),
    _Option('pythonpath', 'brim', _directories, ()),
    _Option('user', 'brim', _text, None),
    _Option('group', 'brim', _text, None),
    _Option('umask', 'brim', _octal, 0o022, show='{:04o}'.format),
    _Option('pid_file', 'brim', _path, None),
    _Option('graceful_timeout', 'brim', _float, 30.0),
    # Time for load balancers to see readiness fail before the ports close.
    _Option('shutdown_delay', 'brim', _at_least_seconds, 0.0),
    _Option('log_name', _EVERY_KIND, _text, 'brim', from_brim=True),
    _Option('log_level', _EVERY_KIND, _log_level, 'INFO', from_brim=True),
    _Option('log_facility', _EVERY_KIND, _log_facility, 'LOCAL0',
            from_brim=True),
    _Option('log_file', _EVERY_KIND, _path, None, from_brim=True),
    _Option('log_format', _EVERY_KIND, _log_format, 'text', from_brim=True),
    _Option('json_dumps', _SUBSERVERS, _text, 'json.dumps', from_brim=True),
    _Option('json_loads', _SUBSERVERS, _text, 'json.loads', from_brim=True),
    _Option('workers', _SUBSERVERS, _workers, _WorkerCount(1, 1),
            from_brim=True, show=str),
    _Option('worker_timeout', _SUBSERVERS, _worker_timeout, 30.0,
            from_brim=True),
    _Option('ip', _LISTENERS, _text, '*', from_brim=True),
    _Option('port', _LISTENERS, _port, 80, from_brim=True),
    _Option('backlog', _LISTENERS, _at_least(1), 4096, from_brim=True),
    _Option('listen_retry', _LISTENERS, _float, 30.0, from_brim=True),
    _Option('client_timeout', _LISTENERS, _float, 60.0, from_brim=True),
    _Option('concurrent_per_worker', _LISTENERS, _at_least(1), 1024,
            from_brim=True),
    # Recycling workers bounds what a leaking app can hold; the jitter
    # keeps all workers from recycling at the same moment.
    _Option('max_requests', _LISTENERS, _at_least(0), 0, from_brim=True),
    _Option('max_requests_jitter', _LISTENERS, _at_least(0), 0,
            from_brim=True),
    _Option('certfile', 'wsgi tcp', _path, None, from_brim=True),
    _Option('keyfile', 'wsgi tcp', _path, None, from_brim=True),
    _Option('apps', 'wsgi', _words, ()),
    _Option('request_timeout', 'wsgi', _float, 0.0, from_brim=True),
    _Option('log_headers', 'wsgi', _bool, False, from_brim=True),
    _Option('count_status_codes', 'wsgi', _ints, (404, 408, 499, 501),
            from_brim=True),
    _Option('max_request_line', 'wsgi', _int, 8190, from_brim=True),
    _Option('max_header_line', 'wsgi', _int, 8190, from_brim=True),
    _Option('max_header_count', 'wsgi', _int, 100, from_brim=True),
    _Option('max_body', 'wsgi', _int, None, from_brim=True),
    # Proxies: whose X-Forwarded-* and Forwarded headers brim believes,
    # and who must (and alone may) start a connection with a PROXY header.
    _Option('forwarded_allow_ips', 'wsgi', _peers,
            _peers('brim', 'forwarded_allow_ips', '127.0.0.1,::1'),
            from_brim=True, show=_show_peers),
    _Option('proxy_protocol', 'wsgi tcp', _bool, False, from_brim=True),
    _Option('proxy_allow_ips', 'wsgi tcp', _peers,
            _peers('brim', 'proxy_allow_ips', '127.0.0.1,::1'),
            from_brim=True, show=_show_peers),
    _Option('reuse_port', 'wsgi tcp', _bool, False, from_brim=True),
    _Option('call', 'tcp udp', _text, None),
    _Option('max_datagram_size', 'udp', _int, 65536, from_brim=True),
    _Option('daemons', 'daemons', _words, ()),
    _Option('socket_mode', 'wsgi tcp', _octal, 0o660, from_brim=True,
            show='{:03o}'.format),
    # Room in the stats for workers a running brimd adds (``scale``, or
    # workers = 2..8); None: 4 times the most workers asks for.
    _Option('max_workers', _LISTENERS, _at_least(1), None, from_brim=True),
    # Metrics as statsd lines over UDP (see _Statsd); off without a host.
    _Option('statsd_host', 'brim', _host_port, None, show=_show_host_port),
    _Option('statsd_prefix', 'brim', _statsd_prefix, None),
    # What foreground --reload watches besides the apps' modules and the
    # configuration files: templates, data files (glob patterns).
    _Option('reload_extra_files', 'brim', _paths, ()),
    # The original's event loop and its buffer sizes, and the X-Auth-Token
    # it could log: brim has no use for them.
    _Option('eventlet_hub', _LISTENERS, _text, None, from_brim=True,
            ignored=True),
    _Option('log_auth_tokens', 'wsgi', _text, None, from_brim=True,
            ignored=True),
    _Option('wsgi_input_iter_chunk_size', 'wsgi', _text, None,
            from_brim=True, ignored=True),
    _Option('wsgi_output_iter_chunk_size', 'wsgi', _text, None,
            from_brim=True, ignored=True),
)

_OPTION = {option.name: option for option in _OPTIONS}


def _options_of(kind):
    """The options a section of ``kind`` may hold, in the table's order."""
    return [option for option in _OPTIONS if option.allowed_in(kind)]


class _Settings(object):
    """One section's settings, read once: every option of its kind as an
    attribute, and the values derived from them.  Nothing changes them
    afterwards, so what ``check`` showed is what runs."""

    def __init__(self, section, kind, values, origins, passed):
        # Straight into the instance's dict: __setattr__ refuses.
        self.__dict__.update(values)
        self.__dict__.update(_section=section, _kind=kind, _origins=origins,
                             _passed=tuple(passed))

    def __setattr__(self, name, value):
        raise AttributeError('[%s] settings are read-only' % self._section)

    def __delattr__(self, name):
        raise AttributeError('[%s] settings are read-only' % self._section)

    def lines(self):
        """``check``'s lines: each option, where its value came from, then
        the options left to the section's handler.  [brim]'s are its own
        (the defaults it gives show in the sections that take them)."""
        for option in _options_of(self._kind):
            origin = self._origins[option.name]
            if self._kind not in option.kinds or (option.ignored and
                                                  origin is None):
                continue
            notes = []
            if origin is None:
                notes.append('default')
            elif origin != self._section:
                notes.append('from [brim]')
            if option.ignored:
                notes.append("ignored, as brim has no use for it")
            yield '  %s = %s%s' % (
                option.name, option.show(getattr(self, option.name)),
                '  # ' + ', '.join(notes) if notes else '')
        if self._passed:
            yield '  passed to the handler: %s' % ', '.join(self._passed)


#: Sections whose every option is brim's: an unknown one is a mistake.
#: [tcp] and [udp] sections also hold their handler's options.
_STRICT_KINDS = frozenset(('brim', 'wsgi', 'daemons'))


def _read_settings(conf, section, kind):
    """The settings of ``[section]``, a section of ``kind``.

    Each option comes from the section, else (for the options [brim] gives
    defaults for) from [brim], else from the table.  An option brim does
    not know stops the start (see _unknown_options).
    """
    known = [option.name for option in _options_of(kind)]
    passed = _unknown_options(section, conf.own_options(section), known,
                              strict=kind in _STRICT_KINDS,
                              where="the README lists brim's options "
                                    "under Configuration")
    values, origins = {}, {}
    for option in _options_of(kind):
        values[option.name], origins[option.name] = _setting(conf, section,
                                                             option)
    values.update(_derived(section, kind, values))
    return _Settings(section, kind, values, origins, passed)


def _setting(conf, section, option):
    """(value, the section it came from) of ``option`` for ``[section]``;
    (default, None) when no section sets it."""
    for where in (section, 'brim') if option.from_brim else (section,):
        text = conf.get(where, option.name)
        if text is not None:
            return option.convert(where, option.name, text), where
    return option.default, None


def _derived(section, kind, values):
    """The values brim computes from a subserver's settings, in one place:
    the functions json_dumps and json_loads name, and the TLS context."""
    if kind == 'brim':
        return {}
    derived = {'dumps': import_call(section, values['json_dumps']),
               'loads': import_call(section, values['json_loads'])}
    if kind in ('wsgi', 'tcp', 'udp'):
        derived['max_workers'] = _max_workers(section, values)
    if kind in ('wsgi', 'tcp'):
        derived['tls'] = _tls_context(section, values['certfile'],
                                      values['keyfile'])
    elif kind == 'udp':
        derived['tls'] = None
    return derived


def _max_workers(section, values):
    """The most workers the section may run: max_workers, by default 4
    times what workers asks for."""
    most = values['workers'].most
    if values['max_workers'] is None:
        return 4 * most
    if values['max_workers'] < most:
        raise ConfError('[%s] max_workers %d is below workers %s; raise '
                        'max_workers or lower workers.'
                        % (section, values['max_workers'], values['workers']))
    return values['max_workers']


def _tls_context(section, certfile, keyfile):
    """An SSLContext from ``certfile`` / ``keyfile``; None: plain."""
    if not certfile:
        if keyfile:
            raise ConfError('[%s] keyfile %s needs a certfile too.'
                            % (section, keyfile))
        return None
    for option, path in (('certfile', certfile), ('keyfile', keyfile)):
        try:
            if path:
                open(path, 'rb').close()
        except OSError as err:
            raise ConfError('[%s] %s %s cannot be read: %s.' % (
                section, option, path, err.strerror or err))
    import ssl      # only here: it costs every start a few ms
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as err:
        raise ConfError('[%s] certfile %s%s: not a usable certificate '
                        'and private key (%s)%s.' % (
                            section, certfile,
                            ' / keyfile %s' % keyfile if keyfile else '',
                            _one_line(err), '' if keyfile else
                            '; set keyfile, or put the key in certfile'))
    return context


def _unknown_options(section, given, known, strict, where):
    """The options of ``given`` not in ``known``, left to a handler.

    Where every option is brim's or a declaring app's (``strict``), any
    such option stops the start; elsewhere only a near miss of a known
    one does, as a handler's own option is seldom one edit from brim's.
    """
    passed = []
    for option in given:
        if option in known:
            continue
        if strict or _near_misses(option, known):
            raise ConfError(_unknown_line(section, option, known, where))
        passed.append(option)
    return passed


def _near_misses(option, known):
    """The known options ``option`` is a slip of: the same but for case, or
    an edit or two away (one for names of up to five letters, none for
    two: ``id`` is too near ``ip`` to be judged a slip of it)."""
    return [name for name in known if name.lower() == option.lower() or
            _edit_distance(option, name) <= min(2, len(name) // 3)]


def _edit_distance(a, b):
    """Inserts, deletes, replaces and swaps of neighbours from a to b."""
    before, previous = None, list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1,
                       previous[j - 1] + (char != other))
            if i > 1 and j > 1 and char == b[j - 2] and a[i - 2] == other:
                cost = min(cost, before[j - 2] + 1)
            current.append(cost)
        before, previous = previous, current
    return previous[-1]


def _unknown_line(section, option, known, where):
    """The one line that refuses ``option``, with the options meant."""
    if option in _OPTION:
        return '[%s] unknown option %r (%s belongs in %s)' % (
            section, option, option, _sections_of(_OPTION[option]))
    import difflib      # only here: a start that passes never needs it
    close = _near_misses(option, known) or difflib.get_close_matches(
        option, known, 3)
    if not close:
        return '[%s] unknown option %r (%s)' % (section, option, where)
    quoted = ['%r' % name for name in close]
    meant = quoted[-1]
    if len(quoted) > 1:
        meant = '%s or %s' % (', '.join(quoted[:-1]), meant)
    return '[%s] unknown option %r (did you mean %s?)' % (section, option,
                                                          meant)


def _sections_of(option):
    """'[tcp] or [udp]': where ``option`` may be set."""
    kinds = sorted(option.kinds, key=_EVERY_KIND.split().index)
    if option.from_brim and 'brim' not in kinds:
        kinds.append('brim')
    names = ['[%s]' % kind for kind in kinds]
    if len(names) == 1:
        return names[0]
    return '%s or %s' % (', '.join(names[:-1]), names[-1])


def _app_call(conf, section):
    """``call`` of an app's (or a daemon's) section: the one option brim
    reads there; '' when it is not set."""
    return conf.get(section, 'call') or ''


def _check_app_options(section, cls, conf, also_known=()):
    """Refuse options ``cls`` (an app, handler or daemon class that
    declares ``options``) does not know in ``[section]``; ``call`` and
    ``also_known`` (brim's, in a [tcp] or [udp] section) are known too."""
    declared = getattr(cls, 'options', None)
    if declared is None:
        return
    where = '%s knows %s' % (cls.__name__, ', '.join(['call'] +
                                                      list(declared)))
    if also_known:
        where += "; the README lists brim's options under Configuration"
    _unknown_options(section, conf.own_options(section),
                     ['call'] + list(declared) + list(also_known),
                     strict=True, where=where)


# Names that configs may spell as the original package's module paths, for
# example ``call = brim.wsgi_echo.WSGIEcho``; they all live in this file.
_SUBMODULES = {
    'brim.server': ('Server', 'Subserver'),
    'brim.conf': ('Conf', 'read_conf', 'ConfError'),
    'brim.wsgi_echo': ('WSGIEcho',),
    'brim.wsgi_stats': ('WSGIStats',),
    'brim.wsgi_health': ('WSGIHealth',),
    'brim.tcp_echo': ('TCPEcho',),
    'brim.udp_echo': ('UDPEcho',),
    'brim.daemon_sample': ('DaemonSample',),
    'brim.wsgi_fs': ('WSGIFS',),
    'brim.wsgi_basic_auth': ('WSGIBasicAuth',),
    'brim.httpform': ('iter_form', 'parse_attrs', 'FormInvalid'),
    'brim.http': (
        'HTTPException', 'quote', 'http_date', 'parse_http_date',
        'HTTPOk', 'HTTPCreated', 'HTTPAccepted', 'HTTPNoContent',
        'HTTPPartialContent', 'HTTPMovedPermanently', 'HTTPFound',
        'HTTPSeeOther', 'HTTPNotModified', 'HTTPTemporaryRedirect',
        'HTTPPermanentRedirect', 'HTTPBadRequest', 'HTTPUnauthorized',
        'HTTPForbidden', 'HTTPNotFound', 'HTTPMethodNotAllowed',
        'HTTPRequestTimeout', 'HTTPConflict', 'HTTPGone',
        'HTTPLengthRequired', 'HTTPPreconditionFailed',
        'HTTPRequestEntityTooLarge', 'HTTPRequestURITooLong',
        'HTTPUnsupportedMediaType', 'HTTPRequestedRangeNotSatisfiable',
        'HTTPTooManyRequests', 'HTTPInternalServerError',
        'HTTPNotImplemented', 'HTTPBadGateway', 'HTTPServiceUnavailable',
        'HTTPGatewayTimeout'),
}


def _register_submodules(module):
    """Make ``brim.wsgi_echo`` and friends importable aliases of this file."""
    for dotted, names in _SUBMODULES.items():
        alias = types.ModuleType(dotted)
        for name in names:
            setattr(alias, name, getattr(module, name))
        sys.modules.setdefault(dotted, alias)
        setattr(module, dotted.split('.', 1)[1], alias)


def import_call(section, dotted):
    """Resolve ``call = package.module.Name`` for ``[section]``."""
    module_name, _, attr = dotted.strip().rpartition('.')
    if not module_name or ':' in dotted:
        raise ConfError('[%s] call = %s is not a dotted name like '
                        'package.module.Class.' % (section, dotted))
    return _import_name(section, dotted, module_name, attr)


# ``call = package.module:name``, the colon as gunicorn and uWSGI spell it:
# a plain WSGI app, served as it is; ``package.module:factory()``: a
# function that makes one (Flask's create_app()).
_PLAIN_APP = re.compile(r'([A-Za-z_][\w.]*):([A-Za-z_]\w*)(\(\))?\Z')


def import_app(section, spec):
    """(object, is_factory) for ``call = package.module:name`` or
    ``package.module:factory()`` in ``[section]``.

    The module is imported here, in the main process, as classes are: a
    broken import stops ``check`` and ``start``.  A factory is called
    later, once in each worker.
    """
    match = _PLAIN_APP.match(spec.strip())
    if not match:
        raise ConfError('[%s] call = %s is not package.module:app or '
                        'package.module:factory().' % (section, spec))
    module_name, attr, parens = match.groups()
    app = _import_name(section, spec, module_name, attr)
    if not callable(app):
        raise ConfError('[%s] call = %s is a %s, not callable as a WSGI app%s.'
                        % (section, spec, type(app).__name__,
                           ' factory' if parens else ''))
    return app, bool(parens)


def _import_name(section, spec, module_name, attr):
    """``attr`` of module ``module_name``; a module that is not found
    says where the import looked."""
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception as err:
        where = ''
        if isinstance(err, ModuleNotFoundError):
            where = (' (looked in %s; add its directory to [brim] '
                     'pythonpath)' % ', '.join(_import_places()))
        raise ConfError('[%s] call = %s could not be imported: %s%s'
                        % (section, spec, _one_line(err), where))


def _import_places():
    """sys.path as an import error shows it: the current directory as .,
    the home directory as ~, without the standard library (no app is
    there)."""
    stdlib = os.path.dirname(os.__file__)
    skip = (stdlib, os.path.join(os.path.dirname(stdlib), 'python%d%d.zip'
                                 % sys.version_info[:2]))
    cwd = os.getcwd()
    home = os.path.expanduser('~')
    places = []
    for entry in sys.path:
        path = os.path.abspath(entry)       # '' is the current directory
        if path in skip or (path.startswith(stdlib + os.sep) and
                            not path.endswith('-packages')):
            continue
        if path == cwd:
            path = '.'
        elif path.startswith(home + os.sep):
            path = '~' + path[len(home):]
        if path not in places:
            places.append(path)
    return places


def _put_on_sys_path(pythonpath):
    """Put ``[brim] pythonpath``'s directories, then the current
    directory, first on sys.path, before any call is imported.

    As with gunicorn, an app in the directory brimd starts from needs no
    PYTHONPATH.  A relative directory is taken from the current
    directory, as every relative path in the configuration is, and made
    absolute now: an app that changes directory changes nothing.
    """
    places = [os.path.abspath(os.path.expanduser(path))
              for path in pythonpath]
    places.append(os.getcwd())
    sys.path[:] = places + [path for path in sys.path if path not in places]


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------
#
# brim's lines must reach brim's destination whatever an app does with the
# logging module, and a destination that fails must cost lines, never a
# request.  Apps do reconfigure logging: Django calls dictConfig when its
# WSGI handler is built, Flask's docs show it at import.  dictConfig (and
# fileConfig) closes every handler in the process, as logging.shutdown()
# does, and, unless the config says disable_existing_loggers: False,
# disables every logger the config does not name.  So brim's loggers cannot
# be disabled (_Logger), only brim closes its handlers (_Handler), and a
# line that cannot be written is counted, not reported on stderr: in a
# daemonized brimd stderr is brim's log again (_LogStream).

#: Between INFO and WARNING: one line per request or datagram lands here.
NOTICE = 25
logging.addLevelName(NOTICE, 'NOTICE')

class _DateCache(object):
    """A time formatted once a second, not per request: the Date header,
    the request log line's time."""

    def __init__(self, format_time):
        self.format_time = format_time
        self.second = 0
        self.value = ''

    def __call__(self):
        now = int(time.time())
        if now != self.second:
            self.value = self.format_time(now)
            self.second = now
        return self.value


class _LogLines(object):
    """This process's log lines: ``serving.txn`` is the txn of the
    request a thread serves (a thread-local), stamped on every line it
    logs; ``time`` the request line's time, formatted once a second;
    ``dropped`` counts the lines that could not be written, for the
    worker's log_lines_dropped stat (copied there once a second, in
    _tick); ``batched`` lists the handlers whose lines wait to be sent
    together (see _Handler)."""

    def __init__(self):
        self.serving = threading.local()
        self.time = _DateCache(lambda now: time.strftime(
            '%Y%m%dT%H%M%SZ', time.gmtime(now)))
        self.dropped = 0
        self.batched = []


_log_lines = _LogLines()


def _count_dropped(lines=1):
    _log_lines.dropped += lines


class _TxnFilter(logging.Filter):
    """Stamps each record with the current thread's txn (or '-')."""

    def filter(self, record):
        record.txn = getattr(_log_lines.serving, 'txn', None) or '-'
        return True


class _Logger(logging.Logger):
    """brim's loggers: someone else's logging config cannot disable them.

    An app's disable_existing_loggers is meant for its libraries' loggers,
    never for brim's request and error lines.  A config that names brim's
    logger still sets its level, handlers and propagation, as logging
    does: that is the user's choice.
    """

    @property
    def disabled(self):
        return False

    @disabled.setter
    def disabled(self, value):
        pass


class _LogStream(object):
    """A file-like that turns writes into log lines.

    A daemonized brimd has no terminal: stray prints and uncaught
    exceptions come here instead of vanishing.  A line written while its
    thread is already logging one (an app's StreamHandler on brim's logger
    writes here, which logs to that handler again) is dropped and counted:
    it would come back for ever.
    """

    def __init__(self, logger, level):
        self.logger = logger
        self.level = level
        self.pending = ''
        self.busy = threading.local()

    def write(self, text):
        if getattr(self.busy, 'logging', False):
            _count_dropped(text.count('\n'))
            return len(text)
        self.busy.logging = True
        try:
            self.pending += text
            while '\n' in self.pending:
                line, self.pending = self.pending.split('\n', 1)
                if line.strip():
                    self.logger.log(self.level, 'STDOUT/ERR: %s', line)
        finally:
            self.busy.logging = False
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False


class _Formatter(logging.Formatter):
    """A Formatter that renders the time once a second, not per line, and
    a request line (a _RequestRecord: no arguments, no traceback) without
    logging's general machinery."""

    _stamp = (None, '')     # (second, text): one tuple, so threads agree

    def format(self, record):
        if type(record) is _RequestRecord:
            return self._fmt % {'asctime': self.formatTime(record),
                                'name': record.name, 'levelname': 'NOTICE',
                                'txn': record.txn, 'message': record.msg}
        return logging.Formatter.format(self, record)

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        stamp = self._stamp
        if second != stamp[0]:
            stamp = self._stamp = (second, time.strftime(
                '%Y-%m-%d %H:%M:%S', time.localtime(second)))
        return '%s,%03d' % (stamp[1], record.msecs)


class _JSONFormatter(_Formatter):
    """``log_format = json``: each line one JSON object.

    A request line's record carries its ``fields``; any other line is
    time, level, name, txn and message (and the traceback, if any).
    JSON escaping keeps whatever a client sent inside its string.
    """

    def format(self, record):
        fields = {'time': '%s.%03dZ' % (self.utc(record.created),
                                        record.msecs),
                  'level': record.levelname, 'name': record.name}
        if getattr(record, 'fields', None):
            fields.update(record.fields)
        else:
            fields['txn'] = record.txn
            fields['message'] = record.getMessage()
            if record.exc_info:
                fields['exception'] = self.formatException(record.exc_info)
        return json.dumps(fields)

    _utc = (None, '')

    def utc(self, created):
        second = int(created)
        stamp = self._utc
        if second != stamp[0]:
            stamp = self._utc = (second, time.strftime(
                '%Y-%m-%dT%H:%M:%S', time.gmtime(second)))
        return stamp[1]


# Lines a batched log handler (see _Handler) keeps at most before it sends.
_BATCH_LINES = 64


class _Handler(logging.Handler):
    """What brim's handlers share: lines go out in whole-line sends,
    without a lock on the way in; a line that cannot be sent is counted,
    and the next send that gets through is preceded by how many were lost
    and why; only brim closes them.

    logging.Handler's per-handler lock made every request of a busy worker
    queue up behind the others' log lines.  Here a line is put in a queue
    (deque appends need no lock) and sent at once, or, in a worker whose
    threads take turns (batched), when the thread with the turn next looks
    for work, or the queue is long, or the line is a warning or worse:
    many lines in one send, where each send costs a system call and a GIL
    round trip that the worker's other threads feel.  A send holds at most
    BATCH_BYTES of whole lines (PIPE_BUF: a pipe other processes write to
    keeps them whole).  Subclasses ``send`` bytes (returning how many went
    out) and ``shut`` what they opened.
    """

    #: True in a worker whose threads take turns (see _batch_logs).
    batched = False
    BATCH_BYTES = 4096

    def __init__(self):
        logging.Handler.__init__(self)
        self.waiting = collections.deque()  # lines (bytes) to send
        self.sending = threading.Lock()     # one sender at a time: in order
        self.dropped = 0            # lines lost since the last report
        self.drop_reason = ''
        self.cut = False            # a send went out only in part

    def line(self, record):
        return (self.format(record) + '\n').encode('utf-8',
                                                   'backslashreplace')

    def send(self, data):
        raise NotImplementedError

    def handle(self, record):
        if self.filter(record):
            self.emit(record)
        return record

    def emit(self, record):
        try:
            self.waiting.append(self.line(record))
        except Exception:
            self.handleError(record)
            return
        if (not self.batched or record.levelno >= logging.WARNING or
                len(self.waiting) >= _BATCH_LINES):
            self.flush()

    def flush(self):
        """Send the lines that wait, in order."""
        with self.sending:
            while self.waiting:
                data = self._next_send()
                try:
                    if self.dropped:
                        self._report_dropped()
                    self._send_all(data)
                except Exception as err:
                    self._lost(data.count(self.END), err)

    #: What ends a line this handler sends.
    END = b'\n'

    def _next_send(self):
        """Whole lines from the queue, up to BATCH_BYTES (at least one)."""
        parts = [self.waiting.popleft()]
        size = len(parts[0])
        while (self.waiting and size + len(self.waiting[0]) <=
                self.BATCH_BYTES):
            parts.append(self.waiting.popleft())
            size += len(parts[-1])
        return b''.join(parts)

    def _send_all(self, data):
        """All of ``data``: the rest of what a disk or a pipe about full
        took only in part; if that fails, the next send starts on a line
        of its own."""
        sent = self.send(data)
        if sent < len(data):
            self.cut = True
            while sent < len(data):
                sent += self.send(data[sent:])
            self.cut = False

    def handleError(self, record):
        """Count the line instead of printing a traceback on stderr, which
        is this log again in a daemonized brimd (and a stuck pipe in a
        foreground one)."""
        self._lost(1, sys.exc_info()[1])

    def _lost(self, lines, error):
        self.dropped += lines
        self.drop_reason = '%s: %s' % (type(error).__name__, error)
        _count_dropped(lines)

    def _report_dropped(self):
        """Lock held: the line that says how many lines were lost."""
        dropped = self.dropped
        data = self.line(logging.makeLogRecord({
            'name': self.report_name, 'levelno': logging.WARNING,
            'levelname': 'WARNING', 'txn': '-',
            'msg': 'brim dropped %d log line%s (%s)' % (
                dropped, '' if dropped == 1 else 's', self.drop_reason)}))
        if self.cut:
            data = b'\n' + data
        self._send_all(data)
        self.dropped -= dropped
        self.cut = False

    #: The logger name on the line that reports lost lines.
    report_name = 'brim'

    def close(self):
        """Does nothing: an app's logging.config or logging.shutdown()
        closes every handler there is, and brim's must go on (``shut``)."""

    def shut(self):
        """brim's own close, when get_logger replaces the handler (a worker
        replacing the one it inherited from the main process)."""
        self.flush()
        logging.Handler.close(self)


def _batch_logs(logger):
    """Batch the lines of ``logger``'s brim handlers (see _Handler)."""
    _Handler.batched = True
    _log_lines.batched.extend(handler for handler in logger.handlers
                              if isinstance(handler, _Handler))


def _flush_logs():
    """Send the log lines that wait: the thread with the turn, before it
    waits for work; a worker's housekeeping; a worker as it ends."""
    for handler in _log_lines.batched:
        if handler.waiting:
            handler.flush()



class _AppendHandler(_Handler):
    """Writes each record to ``path`` with one ``os.write`` (O_APPEND).

    One write of a whole line is atomic for an appended file, so threads
    and worker processes never interleave lines, and no lock is needed.
    O_NONBLOCK changes nothing for a file; for a FIFO it means a reader
    that stops drops lines instead of stopping the worker.
    """

    #: Every open one, for SIGUSR1 (reopen after logrotate).
    open_handlers = set()

    FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK

    def __init__(self, path):
        _Handler.__init__(self)
        self.path = path
        self.fd = os.open(path, self.FLAGS, 0o644)
        self.open_handlers.add(self)

    def reopen(self):
        """Point this handler's fd at a fresh open of ``path``.

        dup2 swaps the file under the same fd number, so a thread writing
        at that moment writes to the old file or the new one, never to a
        closed or reused fd.  The open takes that very number when
        something else closed it: it is then already in place.
        """
        try:
            fd = os.open(self.path, self.FLAGS, 0o644)
        except OSError as err:
            sys.stderr.write('brimd: cannot reopen log file %s: %s\n'
                             % (self.path, err))
            return
        if fd != self.fd:
            os.dup2(fd, self.fd, inheritable=False)
            os.close(fd)

    def send(self, data):
        return os.write(self.fd, data)

    def shut(self):
        self.open_handlers.discard(self)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        _Handler.shut(self)


def _reopen_logs():
    for handler in list(_AppendHandler.open_handlers):
        handler.reopen()


class _StderrHandler(_Handler):
    """Writes each record to standard error, and never waits on it.

    A pipe that nobody reads (a supervisor that hung, a ``| less`` left
    alone) fills up, and a write to it would stop the worker.  So a pipe
    is opened anew through /proc/self/fd/2: a new open file description,
    whose O_NONBLOCK leaves the pipe blocking for everyone else writing to
    it; a line that does not fit is dropped.  A socket (journald's) gets
    MSG_DONTWAIT sends.  A terminal or a file is written as it is.
    """

    def __init__(self):
        _Handler.__init__(self)
        self.fd = 2
        self.sock = None
        try:
            mode = os.fstat(2).st_mode
        except OSError:
            mode = 0                # closed: each line a counted EBADF
        if S_ISFIFO(mode):
            try:
                self.fd = os.open('/proc/self/fd/2',
                                  os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass        # no /proc, or no reader: fd 2 then fails (EPIPE)
        elif S_ISSOCK(mode):
            self.sock = socket.socket(fileno=os.dup(2))

    def send(self, data):
        if self.sock is not None:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        return os.write(self.fd, data)

    def shut(self):
        if self.sock is not None:
            self.sock.close()
        elif self.fd != 2:
            os.close(self.fd)
        _Handler.shut(self)


# syslog severities (RFC 5424) of the levels; others are warnings, as for
# logging's SysLogHandler.
_SEVERITIES = {logging.DEBUG: 7, logging.INFO: 6, NOTICE: 5,
               logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _SyslogHandler(_Handler):
    """Sends each record to the local syslog socket, without waiting.

    A syslog daemon that falls behind (journald under a flood) fills its
    socket's queue; a blocking send would then stop the worker, so the
    socket is non-blocking and a line that does not fit is dropped.  When
    the daemon restarts, the next line connects again.
    """

    # One line a datagram.
    BATCH_BYTES = 0
    END = b'\0'

    def __init__(self, path, facility):
        _Handler.__init__(self)
        self.path = path
        self.facility = facility << 3
        self.sock = None

    def line(self, record):
        return b'<%d>%s\0' % (
            self.facility | _SEVERITIES.get(record.levelno, 4),
            self.format(record).encode('utf-8', 'backslashreplace'))

    def send(self, data):
        sock = self.sock
        if sock is not None:
            try:
                return sock.send(data)
            except BlockingIOError:
                raise               # full: this line is dropped
            except OSError:
                sock.close()        # the daemon restarted: connect again
        self.sock = sock = self._connect()
        return sock.send(data)

    def _connect(self):
        """A socket connected to ``path``: datagrams, else a stream."""
        try:
            return self._socket(socket.SOCK_DGRAM)
        except OSError:
            return self._socket(socket.SOCK_STREAM)

    def _socket(self, kind):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.setblocking(False)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def shut(self):
        if self.sock is not None:
            self.sock.close()
        _Handler.shut(self)


class _RequestRecord(logging.LogRecord):
    """The request line's record, built lean: it is made per request.

    LogRecord's own constructor looks up the caller's frame, the thread,
    the process and the multiprocessing name, none of which brim's formats
    show; that was most of the cost of serving a small request.
    """

    def __init__(self, name, line):
        self.name = name
        self.msg = line
        self.args = None
        self.levelno = NOTICE
        self.levelname = 'NOTICE'
        self.created = time.time()
        self.msecs = (self.created - int(self.created)) * 1000
        self.exc_info = self.exc_text = self.stack_info = None
        self.pathname = self.filename = self.module = self.funcName = ''
        self.lineno = 0


_FACILITIES = logging.handlers.SysLogHandler.facility_names
_SYSLOG_SOCKETS = ('/dev/log', '/var/run/syslog')


def _syslog_socket():
    """The local syslog socket path, or None where there is none."""
    for path in _SYSLOG_SOCKETS:
        if os.path.exists(path):
            return path
    return None


def _log_destination(log_file, to_stderr):
    """Where logs go: ('stderr'|'file'|'syslog', detail)."""
    if log_file:
        return 'file', log_file
    if to_stderr:
        return 'stderr', None
    path = _syslog_socket()
    if path:
        return 'syslog', path
    return 'stderr', None


def _log_settings(section, log_level, log_facility):
    """(level number, facility number), or a ConfError naming the option."""
    return (_log_level_number(section, log_level),
            _log_facility_number(section, log_facility))


def _log_level_number(section, log_level):
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise ConfError('[%s] log_level %r is not one of DEBUG, INFO, NOTICE, '
                        'WARNING, ERROR, CRITICAL.' % (section, log_level))
    return level


def _log_facility_number(section, log_facility):
    facility = _FACILITIES.get(log_facility.lower())
    if facility is None:
        raise ConfError('[%s] log_facility %r is not a syslog facility such '
                        'as LOCAL0.' % (section, log_facility))
    return facility


def get_logger(log_name='brim', log_level='INFO', log_facility='LOCAL0',
               log_file=None, to_stderr=False, log_format='text'):
    """The configured logger for ``log_name`` (created once per name).

    ``log_format`` 'json' makes every line one JSON object, for shipping.
    """
    logger = logging.getLogger(log_name)
    if type(logger) is logging.Logger:
        logger.__class__ = _Logger      # an app's own class stays its own
    logger.propagate = False
    level, facility = _log_settings(log_name, log_level, log_facility)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, _Handler):
            handler.shut()      # an app's may serve other loggers: left open
    kind, detail = _log_destination(log_file, to_stderr)
    if kind == 'file':
        handler = _AppendHandler(detail)
        fmt = '%(asctime)s %(name)s %(levelname)s %(txn)s %(message)s'
    elif kind == 'syslog':
        handler = _SyslogHandler(detail, facility)
        fmt = '%(name)s %(levelname)s %(txn)s %(message)s'
    else:
        handler = _StderrHandler()
        fmt = '%(asctime)s %(name)s %(levelname)s %(txn)s %(message)s'
    handler.setFormatter(_JSONFormatter() if log_format == 'json'
                         else _Formatter(fmt))
    handler.addFilter(_TxnFilter())
    handler.report_name = log_name
    logger.addHandler(handler)
    return logger


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------

#: How a stat rolls up across the workers of a subserver.
STAT_TYPES = ('worker', 'sum', 'min', 'max', 'daemon')


class _StatsLayout(object):
    """The stats' shared memory, and where everything lies in it.

    Made in the main process before forking, so every worker maps the
    same memory.  Nothing else knows an offset: a worker writes through
    its bucket (``bucket``), and whatever shows the stats (/stats,
    /metrics, the stats page, ``status``) is made from one ``read``.

    A subserver has one bucket per worker (or daemon), a bucket one
    unsigned 64-bit slot per stat: first the HIDDEN ones brim keeps for
    itself, then the declared ones in stats_conf's order.  Beside the
    slots, each bucket has LATEST_SIZE bytes for "txn METHOD path" of its
    latest request, for the log line about a hung worker.  After the
    buckets, one slot is brimd's own: nonzero while the main process
    reports not ready (shutdown_delay).  Only the main process writes it,
    and a worker reads it on each readiness probe: shared memory every
    worker maps already, where a signal would need a handler in each.
    """

    (HEARTBEAT, SERVED, REQUEST_START, PID, RESTARTS, OPEN, IN_FLIGHT,
     BUSY_USEC) = range(8)
    #: The hidden stats: the heartbeat (milliseconds since the epoch);
    #: what the worker served (requests, connections or datagrams), for
    #: ``status``; when its latest request started; its pid (0 while it is
    #: down) and its slot's restarts, so the stats any worker answers say
    #: what every other one is; one more than its open connections, from
    #: its start until it stops accepting for good (0 otherwise), for its
    #: siblings (see _Siblings); how many requests it is serving now, and
    #: for how long in all it has been serving them (microseconds), which
    #: tell ``top`` and workers = 2..8 how busy it is.
    HIDDEN = ('_heartbeat', '_served', '_request_start', '_pid',
              '_restarts', '_open', '_in_flight', '_busy_usec')
    LATEST_SIZE = 160

    def __init__(self, subservers):
        self._regions = {}
        offset = ordinal = 0
        for subserver in subservers:
            region = _StatsRegion(subserver, offset, ordinal)
            self._regions[subserver.name] = region
            offset += region.size * len(region.labels) + 1
            ordinal += len(region.labels)
        # 'Q': unsigned 64-bit.  lock=False: see _Bucket for who writes.
        self._not_ready_slot = offset
        self._array = multiprocessing.Array('Q', offset + 1, lock=False)
        self._latest = multiprocessing.RawArray(
            'c', max(ordinal, 1) * self.LATEST_SIZE)
        for subserver in subservers:
            self.set_target(subserver, subserver.starting_workers)

    def bucket(self, subserver, index):
        """Where worker ``index`` of ``subserver`` keeps its stats."""
        region = self._regions[subserver.name]
        base = region.offset + index * region.size
        return _Bucket(subserver.worker_label(index), self._array, base,
                       {name: base + slot
                        for name, slot in region.slots.items()},
                       self._latest,
                       (region.ordinal + index) * self.LATEST_SIZE)

    def set_target(self, subserver, count):
        """Say how many workers ``subserver`` is to run now (the main
        process, as it scales), for every view of the stats."""
        self._array[self._regions[subserver.name].target_slot] = count

    def set_not_ready(self):
        """Have every worker's readiness probe fail from now on (main
        process, at the start of shutdown_delay)."""
        self._array[self._not_ready_slot] = 1

    def ready(self):
        """False once the main process has said brimd is not ready."""
        return not self._array[self._not_ready_slot]

    def read(self, start_time):
        """Every stat of every bucket, read now, as a _StatsReading;
        ``start_time`` is brimd's."""
        values = self._array[:]
        return _StatsReading(start_time, {
            name: region.read(values) for name, region in
            self._regions.items()})


class _StatsRegion(object):
    """Where one subserver's buckets lie in the shared array, and what it
    declared: a copy of its stats_conf as the layout was made, so that the
    layout never has to ask the subserver again.  After the buckets, one
    slot holds how many workers the subserver is to run now (its target),
    written by the main process only."""

    def __init__(self, subserver, offset, ordinal):
        self.name = subserver.name
        self.kind = subserver.kind
        self.labels = subserver.bucket_labels()
        self.types = dict(subserver.stats_conf)
        names = list(_StatsLayout.HIDDEN) + list(self.types)
        self.slots = {name: slot for slot, name in enumerate(names)}
        self.size = len(names)
        self.offset = offset
        self.ordinal = ordinal
        self.target_slot = offset + self.size * len(self.labels)

    def read(self, values):
        """This subserver's _SubserverStats, from all of the array's
        ``values``.

        Its buckets are room for as many workers as it may come to run;
        the ones shown are those of the workers it runs now (its target),
        and of any other that is still running (draining, after a scale
        down).  What a stat rolls up to counts every bucket, so that
        retiring a worker loses no count.
        """
        target = values[self.target_slot]
        buckets = [values[base:base + self.size] for base in range(
            self.offset, self.target_slot, self.size)]
        shown = [(label, bucket) for index, (label, bucket) in
                 enumerate(zip(self.labels, buckets))
                 if index < target or bucket[_StatsLayout.PID]]
        started = self.slots.get('start_time')
        workers = [_WorkerStats(label, bucket[_StatsLayout.PID],
                                bucket[_StatsLayout.RESTARTS],
                                bucket[_StatsLayout.SERVED],
                                0 if started is None else bucket[started],
                                _in_flight(bucket[_StatsLayout.IN_FLIGHT]),
                                bucket[_StatsLayout.BUSY_USEC])
                   for label, bucket in shown]
        stats = []
        for name, stat_type in self.types.items():
            slot = self.slots[name]
            per_worker = {label: bucket[slot] for label, bucket in shown}
            every = [bucket[slot] for bucket in buckets]
            stats.append(_Stat(name, stat_type, per_worker,
                               _roll_up(stat_type, every)))
        return _SubserverStats(self.name, self.kind, workers, stats, target)


def _in_flight(count):
    """What a bucket's in-flight slot holding ``count`` has in flight.  A
    replacement shares the bucket of the worker it replaces, and one of
    them may have cleared the count while the other still ends requests,
    taking it below 0 (a huge unsigned number): that reads as 0."""
    return count if count < 1 << 63 else 0


#: What _StatsLayout.read gives: brimd's start time, and each subserver's
#: _SubserverStats by section name, in the configuration's order.
_StatsReading = collections.namedtuple('_StatsReading',
                                       'start_time subservers')
#: A subserver's _WorkerStats (one per worker shown) and _Stats (one per
#: declared stat, in stats_conf's order); how many workers it is to run.
_SubserverStats = collections.namedtuple('_SubserverStats',
                                         'name kind workers stats target')
#: What brim keeps of a worker or daemon: pid (0 while it is down),
#: restarts, what it served, its start_time stat (0 if none), what it
#: serves now and how long it has served in all (microseconds).
_WorkerStats = collections.namedtuple(
    '_WorkerStats', 'label pid restarts served started in_flight busy_usec')
#: A declared stat: {worker label: value}, and what that rolls up to (None
#: for worker and daemon stats).
_Stat = collections.namedtuple('_Stat', 'name type per_worker rolled')


class _Bucket(object):
    """One worker's stats: ``get``, ``set`` and ``incr`` by name.

    This is ``env['brim.stats']``.  Values are unsigned integers.  A name
    no stats_conf declared has no slot: as in the original brimd, ``get``
    gives 0 and ``set`` and ``incr`` do nothing, and the worker logs it
    once per name, so the slip shows without failing the request.

    Who writes a bucket.  Its worker, from its threads: increments under
    the bucket's lock, so they are exact.  The main process writes only
    hidden slots (and the layout's not-ready slot, beyond every bucket),
    with plain stores: before it forks a worker into the
    bucket it clears them (``reset``) and sets _restarts; once it has
    reaped the worker it sets _pid to 0.  A worker then is either not yet
    forked or gone, with one exception: a worker being replaced (at
    max_requests, say) drains while its replacement starts in the same
    bucket, and both write it until the old one exits.  Then either's
    store may replace the other's (a heartbeat, the pid), and an
    increment may be lost to the other's at the same instant, as their
    locks are not shared.  Readers, in any process, take no lock: a slot
    is one aligned 64-bit word, so a read sees a whole value, old or new.
    """

    def __init__(self, owner, array, base, slots, latest, latest_offset):
        self.owner = owner          # "[wsgi] worker 0", for log lines
        self.logger = None          # the worker's, given as it starts
        self._array = array
        self._base = base           # the bucket's first slot in the array
        self._slots = slots         # {stat name: its slot in the array}
        self._lock = threading.Lock()
        self._latest = latest
        self._latest_offset = latest_offset
        self._latest_address = ctypes.addressof(latest) + latest_offset
        self._undeclared_names = set()     # names already logged

    # get, set and incr look the name up inline: they are on apps' hot
    # path, and only an undeclared name pays for more.

    def get(self, name):
        try:
            return self._array[self._slots[name]]
        except KeyError:
            self._undeclared(name)
            return 0

    def set(self, name, value):
        try:
            self._array[self._slots[name]] = int(value)
        except KeyError:
            self._undeclared(name)

    def incr(self, name, amount=1):
        try:
            slot = self._slots[name]
        except KeyError:
            self._undeclared(name)
            return
        with self._lock:
            self._array[slot] += amount

    def slots(self, names):
        """The slots of ``names`` (all declared), for ``incr_slots``: so a
        hot path looks names up once, not per use."""
        return tuple(self._slots[name] for name in names)

    def incr_slots(self, slots):
        """Add one to each stat of ``slots``, from ``slots()``."""
        array = self._array
        with self._lock:
            for slot in slots:
                array[slot] += 1

    def begin(self):
        """A request, connection or datagram starts: one more served, one
        more in flight."""
        array, base = self._array, self._base
        with self._lock:
            array[base + _StatsLayout.SERVED] += 1
            array[base + _StatsLayout.IN_FLIGHT] += 1

    def end(self, seconds, slots=()):
        """What began has ended after ``seconds``: no longer in flight, its
        time added to the busy time; and one added to each stat of
        ``slots`` (from ``slots()``), under the same lock."""
        array, base = self._array, self._base
        with self._lock:
            for slot in slots:
                array[slot] += 1
            array[base + _StatsLayout.IN_FLIGHT] -= 1
            array[base + _StatsLayout.BUSY_USEC] += int(seconds * 1e6)

    def _undeclared(self, name):
        """Log, the first time only, that ``name`` has no slot."""
        with self._lock:
            if name in self._undeclared_names:
                return
            self._undeclared_names.add(name)
        declared = list(self._slots)[len(_StatsLayout.HIDDEN):]
        self.logger.warning(
            '%s: stat %r is not declared, so it is not kept (get gives 0); '
            'add it to a stats_conf (declared: %s)', self.owner, name,
            ', '.join(declared) or 'none')

    def beat(self):
        self._array[self._base + _StatsLayout.HEARTBEAT] = int(
            time.time() * 1000)

    def heartbeat(self):
        """When the worker last beat (seconds since the epoch), or 0."""
        return self._array[self._base + _StatsLayout.HEARTBEAT] / 1000.0

    def note_request(self, started, txn, method, path):
        """Record the request just started, for a hung-worker report."""
        self._array[self._base + _StatsLayout.REQUEST_START] = int(started)
        text = ('%s %s %s' % (txn, method, path)).encode('utf-8', 'replace')
        text = text[:_StatsLayout.LATEST_SIZE - 1] + b'\0'
        ctypes.memmove(self._latest_address, text, len(text))

    def latest_request(self):
        """(start time, "txn METHOD path") of the latest request, if any."""
        start = self._latest_offset
        text = self._latest[start:start + _StatsLayout.LATEST_SIZE]
        return (self._array[self._base + _StatsLayout.REQUEST_START],
                text.split(b'\0', 1)[0].decode('utf-8', 'replace'))

    def reset(self):
        """Clear the hidden slots for a new worker in this bucket: all but
        what is in flight and the busy time, which a worker it replaces
        may still be adding to as it drains (see ``clear_in_flight``)."""
        for slot in range(_StatsLayout.IN_FLIGHT):
            self._array[self._base + slot] = 0

    def clear_in_flight(self):
        """The worker died: what it had in flight never ends."""
        self._array[self._base + _StatsLayout.IN_FLIGHT] = 0


def _roll_up(stat_type, values):
    """Combine the per-worker values of one stat."""
    if stat_type == 'sum':
        return sum(values)
    if stat_type == 'min':
        return min(values) if values else 0
    if stat_type == 'max':
        return max(values) if values else 0
    return None


def _stats_snapshot(reading):
    """The nested dict WSGIStats answers, from a _StatsReading.

    Besides one entry per subserver, ``workers`` lists every worker and
    daemon (subserver, kind, label, pid, uptime, restarts); pid is 0 while
    one is down.  It is a list at the top, where no section name can clash.
    """
    snapshot = {'start_time': reading.start_time,
                'workers': list(_worker_records(reading)),
                'scale': _scale_records(reading)}
    for sub in reading.subservers.values():
        entry = snapshot[sub.name] = {}
        for stat in sub.stats:
            if stat.rolled is not None:
                entry[stat.name] = stat.rolled
            for label, value in stat.per_worker.items():
                entry.setdefault(label, {})[stat.name] = value
    return snapshot


def _scale_records(reading):
    """The ``scale`` entry: for each subserver, how many workers it is to
    run (target) and how many run (running: draining ones included)."""
    return {sub.name: {'target': sub.target,
                       'running': sum(1 for w in sub.workers if w.pid)}
            for sub in reading.subservers.values()}


def _worker_records(reading):
    """The ``workers`` entries: what each worker's bucket says of it."""
    now = int(time.time())
    for sub in reading.subservers.values():
        for worker in sub.workers:
            yield {'subserver': sub.name, 'kind': sub.kind,
                   'label': worker.label, 'pid': worker.pid,
                   'restarts': worker.restarts,
                   'uptime': (max(0, now - worker.started) if worker.started
                              else 0)}


def _prometheus_text(reading):
    """A _StatsReading in Prometheus's text exposition format (0.0.4).

    ``sum`` stats are counters (``_total``), the rest gauges; each has a
    series per worker (label ``worker``) and, when it rolls up, one
    without ``worker``.  ``start_time`` becomes brim_start_time_seconds.
    """
    families = {}
    owners = {'brim_start_time_seconds': ('start_time', None)}
    start = families['brim_start_time_seconds'] = (
        'gauge', 'When brimd or a worker started (seconds since the epoch).',
        {(): reading.start_time})
    _add_scale_families(reading, families, owners)
    for sub in reading.subservers.values():
        for stat in sub.stats:
            if stat.name == 'start_time':
                family = start
            else:
                family = families.setdefault(
                    _prometheus_name(stat.name, stat.type, owners),
                    ('counter' if stat.type == 'sum' else 'gauge',
                     'brim stat %s (%s).' % (stat.name, stat.type), {}))
            samples = family[2]
            base = (('subserver', sub.name),)
            if stat.rolled is not None:
                samples.setdefault(base, stat.rolled)
            for label, value in stat.per_worker.items():
                samples.setdefault(base + (('worker', label),), value)
    lines = []
    for metric in sorted(families):
        kind, help_text, samples = families[metric]
        lines.append('# HELP %s %s' % (metric, help_text.replace(
            '\\', '\\\\').replace('\n', '\\n')))
        lines.append('# TYPE %s %s' % (metric, kind))
        for labels in sorted(samples):
            rendered = ','.join('%s="%s"' % (key, _prometheus_label(value))
                                for key, value in labels)
            lines.append('%s%s %s' % (metric, '{%s}' % rendered if rendered
                                      else '', samples[labels]))
    return '\n'.join(lines) + '\n'


def _add_scale_families(reading, families, owners):
    """brim_workers_target and brim_workers_running, per subserver."""
    scale = _scale_records(reading)
    for metric, key, help_text in (
            ('brim_workers_target', 'target',
             'How many workers a subserver is to run.'),
            ('brim_workers_running', 'running',
             'How many worker processes a subserver runs, draining ones '
             'included.')):
        families[metric] = ('gauge', help_text, {
            (('subserver', name),): counts[key]
            for name, counts in scale.items()})
        owners[metric] = (metric, None)


def _prometheus_name(name, stat_type, owners):
    """The metric for stat ``name``: brim_<name>, _total for a counter,
    and one no other stat owns (``hits`` as a sum and ``hits_total`` as a
    max would both be brim_hits_total)."""
    base = 'brim_' + re.sub(r'[^a-zA-Z0-9_]', '_', name)
    suffix = '_total' if stat_type == 'sum' else ''
    while (owners.setdefault(base + suffix, (name, stat_type)) !=
            (name, stat_type)):
        base += '_'
    return base + suffix


def _prometheus_label(value):
    return value.replace('\\', '\\\\').replace('"', '\\"').replace(
        '\n', '\\n')


# ---------------------------------------------------------------------------
# Statsd
# ---------------------------------------------------------------------------

class _Statsd(object):
    """One process's statsd client, for [brim] statsd_host: metrics as
    statsd lines, batched, sent over UDP.

    Each process has its own, with its own socket (a worker makes its
    one after it forks), non-blocking and connected, so that statsd's
    ICMP port unreachable comes back as ECONNREFUSED.  Within a batch a
    counter is one line (``brim.requests:57|c``), a gauge its latest
    value; a timer keeps a line per sample.  A batch goes out, newlines
    between its lines, in datagrams of at most DATAGRAM_SIZE bytes: when
    it fills one (sent by the thread whose line filled it) and at every
    ``flush`` (a worker's housekeeping tick, at least once a second).

    Sending never waits.  When a send fails (statsd gone, the socket's
    buffer full) the rest of the batch is dropped and counted in
    ``dropped`` (datagrams); the next batch tries again, so the lines
    resume by themselves once statsd is back.  A batch never outgrows a
    datagram by more than one request's lines, so a statsd that is gone
    costs no memory.  Threads share one: a lock guards the batch, not the send.
    """

    #: An Ethernet frame's 1,500 bytes, less IP and UDP headers and room
    #: for IP options: no datagram is fragmented.
    DATAGRAM_SIZE = 1400
    #: What a counter's or gauge's line adds to its name, at most counted:
    #: the colon, the digits, the type, the newline.
    VALUE_SIZE = 16

    def __init__(self, family, address, prefix=None):
        self.address = address
        self.dropped = 0
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._connected = False
        self._lock = threading.Lock()
        self._prefix = ((prefix.rstrip('.') + '.') if prefix else '').encode(
            'ascii') + b'brim.'
        self._requests = self._prefix + b'requests'
        # Every status line's name, made once: not on each request.
        self._status = {code: self._prefix + b'request.status.%d' % code
                        for code in range(1000)}
        self._duration = self._prefix + b'request.duration:%.3f|ms'
        self._due = 0.0
        self._new_batch()

    def request(self, code, seconds):
        """A WSGI request answered ``code`` after ``seconds``: counted,
        counted by its status, and its duration (milliseconds) timed."""
        timer = self._duration % (seconds * 1000.0)
        status = self._status[code]
        with self._lock:
            counts = self._counts
            counts[self._requests] = self._value(counts, self._requests) + 1
            counts[status] = self._value(counts, status) + 1
            self._timers.append(timer)
            self._size += len(timer) + 1
            lines = self._take() if self._size >= self.DATAGRAM_SIZE else ()
        if lines:
            self._send(lines)

    def count(self, name, amount=1):
        """Add ``amount`` to counter brim.``name``."""
        name = self._prefix + name.encode()
        with self._lock:
            self._counts[name] = self._value(self._counts, name) + amount

    def gauge(self, name, value):
        """Set gauge brim.``name`` to ``value``."""
        name = self._prefix + name.encode()
        with self._lock:
            self._value(self._gauges, name)
            self._gauges[name] = value

    def _value(self, values, name):
        """(Under the lock.)  A counter's or gauge's value in the batch, 0
        for a new one, which grows the batch by a line."""
        if name not in values:
            self._size += len(name) + self.VALUE_SIZE
            return 0
        return values[name]

    def _new_batch(self):
        self._counts, self._gauges, self._timers, self._size = {}, {}, [], 0

    def _take(self):
        """(Under the lock.)  The batch's lines; a new batch begins."""
        lines = [b'%s:%d|c' % item for item in self._counts.items()]
        lines += [b'%s:%d|g' % item for item in self._gauges.items()]
        lines += self._timers
        self._new_batch()
        return lines

    def flush(self):
        """Send the batch, whatever its size."""
        with self._lock:
            lines = self._take()
        if lines:
            self._send(lines)

    def _send(self, lines):
        """Send ``lines`` in datagrams; on a failure, drop the rest."""
        datagrams = _statsd_datagrams(lines, self.DATAGRAM_SIZE)
        for sent, datagram in enumerate(datagrams):
            try:
                if not self._connected:
                    self._sock.connect(self.address)
                    self._connected = True
                self._sock.send(datagram)
            except OSError:
                with self._lock:
                    self.dropped += len(datagrams) - sent
                return

    def due(self):
        """True at most once a second: time for a process's periodic
        lines."""
        now = time.monotonic()
        if now < self._due:
            return False
        self._due = now + 1.0
        return True

    def close(self):
        self._sock.close()


def _statsd_datagrams(lines, size):
    """``lines`` joined by newlines into datagrams of at most ``size``
    bytes each (a longer line, were there one, goes alone)."""
    datagrams, group, length = [], [], -1
    for line in lines:
        if group and length + 1 + len(line) > size:
            datagrams.append(b'\n'.join(group))
            group, length = [], -1
        group.append(line)
        length += 1 + len(line)
    if group:
        datagrams.append(b'\n'.join(group))
    return datagrams


def _statsd_address(settings):
    """(family, address) of [brim] statsd_host, resolved once, in the main
    process (a name that stops resolving later costs no worker a lookup);
    None when it is not set."""
    if settings.statsd_host is None:
        return None
    host, port = settings.statsd_host
    try:
        family, _type, _proto, _name, address = socket.getaddrinfo(
            host, port, 0, socket.SOCK_DGRAM)[0]
    except (OSError, UnicodeError) as err:
        raise ConfError('[brim] statsd_host %s cannot be resolved (%s); '
                        'give an address, or a name this host resolves.'
                        % (_show_host_port(settings.statsd_host),
                           _one_line(err)))
    return family, address


def _open_statsd(server):
    """A _Statsd of this process's own, or None without statsd_host."""
    if server.statsd_address is None:
        return None
    family, address = server.statsd_address
    return _Statsd(family, address, server.settings.statsd_prefix)


# ---------------------------------------------------------------------------
# Listening sockets
# ---------------------------------------------------------------------------

def _address_family(ip):
    """(family, host) for a configured ``ip``: '*', IPv4, IPv6, name or
    ``unix:PATH`` (then host is the path)."""
    host = ip.strip()
    if host.startswith('unix:'):
        return socket.AF_UNIX, host[5:]
    if host in ('', '*'):
        return socket.AF_INET, '0.0.0.0'
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    if ':' in host:
        return socket.AF_INET6, host
    return socket.AF_INET, host


def _say_busy(section, ip, port, retry_seconds):
    print('[%s] %s:%s is in use; retrying for %gs (listen_retry)'
          % (section, ip, port, retry_seconds), file=sys.stderr)


def _bind(section, ip, port, kind, backlog, retry_seconds,
          reuse_port=False):
    """A bound (and, for TCP, listening) socket, retrying a busy port.

    The socket is inheritable so a restart in place can hand it on.  With
    ``reuse_port``, SO_REUSEPORT: another brimd that sets it too (blue and
    green on one host) shares the port, and the kernel spreads the
    connections between them.
    """
    family, host = _address_family(ip)
    sock_type = socket.SOCK_DGRAM if kind == 'udp' else socket.SOCK_STREAM
    deadline = time.monotonic() + retry_seconds
    waiting = False
    while True:
        sock = socket.socket(family, sock_type)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            if sock_type == socket.SOCK_STREAM:
                sock.listen(backlog)
            return sock
        except OSError as err:
            sock.close()
            if (err.errno == errno.EADDRINUSE and
                    time.monotonic() < deadline):
                if not waiting:     # say so, rather than wait in silence
                    waiting = True
                    _say_busy(section, ip, port, retry_seconds)
                time.sleep(0.1)
                continue
            raise ConfError('[%s] could not bind %s:%s: %s (change ip/port '
                            'in [%s], or stop what holds it).' %
                            (section, ip, port, err.strerror or err,
                             section))


def _bind_unix(section, path, backlog, mode, owner):
    """A listening Unix stream socket at ``path``, its file given ``mode``
    and (uid, gid) ``owner`` (or None), so workers that dropped
    privileges and a proxy in the group can connect.  A file a crash left
    is replaced; one a process listens on is not."""
    _check_unix_path(section, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise ConfError('[%s] ip = unix:%s: could not bind: %s.' % (
            section, path, err.strerror or err))
    return sock


def _check_unix_path(section, path, remove_stale=True):
    """Raise ConfError unless ``path`` can be bound: its directory exists
    and no process listens there.  A stale socket file is removed (unless
    ``remove_stale`` is false: ``check`` changes nothing)."""
    where = '[%s] ip = unix:%s' % (section, path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfError('%s: the directory %s does not exist.'
                        % (where, directory))
    try:
        is_socket = stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    if not is_socket:
        raise ConfError('%s: %s is there and is not a socket; brim does not '
                        'replace it.' % (where, path))
    if _unix_listening(path):
        raise ConfError('%s: a running process listens on it (stop that '
                        'one, or change ip in [%s]).' % (where, section))
    if not remove_stale:
        return
    try:
        os.unlink(path)     # stale: its listener is gone
    except FileNotFoundError:
        pass


def _unix_listening(path):
    """Whether a process accepts connections on the socket file ``path``:
    refused (or gone) means the file is stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


def _socket_key(kind, host, port):
    """What identifies a listening socket across a handover: for a Unix
    socket, ``unix:PATH``."""
    if port is None:
        return 'unix:%s' % host
    return '%s %s %s' % (kind, host, port)


def _socket_key_of(sock):
    if sock.family == socket.AF_UNIX:
        # systemd's ListenStream=/run/x.sock is matched by its path too.
        return _socket_key('tcp', sock.getsockname(), None)
    kind = 'udp' if sock.type == socket.SOCK_DGRAM else 'tcp'
    return _socket_key(kind, *sock.getsockname()[:2])


def _send_sockets(conn, socks):
    """Hand ``socks`` to a new brimd over the Unix socket ``conn``."""
    payload = json.dumps([_socket_key_of(s) for s in socks]).encode('utf-8')
    socket.send_fds(conn, [payload], [sock.fileno() for sock in socks])


def _receive_sockets(conn):
    """The listening sockets an old brimd sent: {key: socket}."""
    payload, fds, _flags, _addr = socket.recv_fds(conn, 65536, 256)
    keys = json.loads(payload.decode('utf-8'))
    socks = {}
    for key, fd in zip(keys, fds):
        socks[key] = socket.socket(fileno=fd)
    return socks


def _sockets_from_fds(fds):
    """{key: socket} for listening sockets passed as open fds."""
    socks = {}
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        socks[_socket_key_of(sock)] = sock
    return socks


def _systemd_sockets():
    """The sockets systemd passed (socket activation), or {}.

    ``LISTEN_PID`` must name this process; the variables are removed so
    nothing started later takes them for its own.
    """
    pid = os.environ.pop('LISTEN_PID', '')
    count = os.environ.pop('LISTEN_FDS', '')
    os.environ.pop('LISTEN_FDNAMES', None)
    if pid != str(os.getpid()) or not count.isdigit():
        return {}
    return _sockets_from_fds(range(3, 3 + int(count)))


# ---------------------------------------------------------------------------
# The HTTP/WSGI path
# ---------------------------------------------------------------------------
#
# A worker's pooled threads take turns to accept connections on the shared
# listening socket, each serving what it accepts (_ConnectionPool).
# _HTTPConnection reads requests with a strict parser written against RFC
# 9112 (bytes splits and precompiled patterns, no email package), calls the
# WSGI app and writes the response with as few send calls as it can:
# usually one.

class _HTTPError(Exception):
    """A request brim refuses: the status to answer and why (for the log)."""

    def __init__(self, status, reason):
        Exception.__init__(self, reason)
        self.status = status
        self.reason = reason


class _AppError(Exception):
    """A WSGI app broke the protocol; the text says what it did wrong."""


class _HTTPLimits(collections.namedtuple('_HTTPLimits', (
        'max_request_line', 'max_header_line', 'max_header_count',
        'max_body', 'client_timeout', 'max_head'))):
    """What a worker's connections allow a client, fixed as it starts:
    the settings of the same names, and ``max_head``, the longest head
    they allow, so reading a head can stop as soon as it is too long."""

    __slots__ = ()

    def __new__(cls, max_request_line, max_header_line, max_header_count,
                max_body, client_timeout):
        max_head = (max_request_line + 4 +
                    max_header_count * (max_header_line + 2))
        return super().__new__(cls, max_request_line, max_header_line,
                               max_header_count, max_body, client_timeout,
                               max_head)

    @classmethod
    def of(cls, settings):
        """The limits a [wsgi] section's settings give."""
        return cls(settings.max_request_line, settings.max_header_line,
                   settings.max_header_count, settings.max_body,
                   settings.client_timeout)


class _HTTPSite(collections.namedtuple('_HTTPSite', (
        'app', 'base_env', 'parser', 'logger', 'tls', 'connections',
        'next_txn', 'began', 'ended', 'refused', 'draining',
        'forwarded_allow'), defaults=(None,))):
    """All a connection sees of the worker that serves it.

    ``app`` is the WSGI app, ``base_env`` what each request's environ
    starts as, ``parser`` the worker's _RequestParser (and its limits);
    ``tls``: whether the sockets are TLS ones; ``connections``, the set
    of open connections (each leaves it as it closes).  A request gets
    its txn from ``next_txn()``; ``began(start, txn, method, path,
    first)`` says it starts (``first``: the connection's first, counted
    when it was accepted), ``ended(env, response, duration, txn)`` that
    it ended (answered, or given up on), whatever happened;
    ``refused(status)`` says brim refused one.  ``draining()``: whether
    the worker drains.
    ``forwarded_allow``: the networks of the proxies whose forwarded
    headers are believed (None: nobody's).
    """

    __slots__ = ()


class _Request(object):
    """One parsed request: its environ, whether the client would keep the
    connection, and its body as brim frames it (which an app or middleware
    may replace in wsgi.input, but brim reads to its end)."""

    __slots__ = ('env', 'keep_alive', 'body')

    def __init__(self, env, keep_alive, body):
        self.env = env
        self.keep_alive = keep_alive
        self.body = body


_RESPONSE_REASONS = {
    100: 'Continue', 200: 'OK', 201: 'Created', 202: 'Accepted',
    204: 'No Content', 206: 'Partial Content', 301: 'Moved Permanently',
    302: 'Found', 303: 'See Other', 304: 'Not Modified',
    307: 'Temporary Redirect', 308: 'Permanent Redirect',
    400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden',
    404: 'Not Found', 405: 'Method Not Allowed', 408: 'Request Timeout',
    409: 'Conflict', 410: 'Gone', 411: 'Length Required',
    412: 'Precondition Failed', 413: 'Content Too Large',
    414: 'URI Too Long', 415: 'Unsupported Media Type',
    416: 'Range Not Satisfiable', 429: 'Too Many Requests',
    431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 501: 'Not Implemented',
    502: 'Bad Gateway', 503: 'Service Unavailable', 504: 'Gateway Timeout',
    505: 'HTTP Version Not Supported',
}


def _status(code):
    """The status line's text for ``code``: '404 Not Found'."""
    return '%d %s' % (code, _RESPONSE_REASONS.get(code, 'Unknown'))


def _plain_answer(code, body=None, headers=(), content_type='text/plain'):
    """(status, headers, body) of a plain-text answer: every answer brim
    makes itself (a refusal, an app that failed, a path no app serves) and
    brim.http's responses.

    ``body`` (bytes) defaults to the status and a newline; a status that
    has no body (1xx, 204, 304) gets none.  Content-Type and
    Content-Length are added unless ``headers`` names them.
    """
    status = _status(code)
    has_body = code >= 200 and code not in _NO_BODY_STATUSES
    if not has_body:
        body = b''
    elif body is None:
        body = (status + '\n').encode('ascii')
    headers = list(headers)
    named = {name.lower() for name, _value in headers}
    if body and 'content-type' not in named:
        headers.append(('Content-Type', content_type))
    if has_body and 'content-length' not in named:
        headers.append(('Content-Length', str(len(body))))
    return status, headers, body


# RFC 9110 tokens; methods are further limited to upper case, 3 to 20
# characters, as gunicorn does, which refuses lower-case smuggling tricks.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD_RE = re.compile(rb"[!$%&'*+\-.^_`|~0-9A-Z]{3,20}")
_KNOWN_METHODS = frozenset((b'GET', b'HEAD', b'POST', b'PUT', b'DELETE',
                            b'OPTIONS', b'PATCH'))
_FIELD_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb'HTTP/([0-9])\.([0-9])')
_TARGET_RE = re.compile(rb'[\x21-\x7e]+')
_AUTHORITY_RE = re.compile(rb'[A-Za-z0-9.\-_~!$&\'()*+,;=:%@\[\]]+')
_AUTHORITY_END_RE = re.compile(rb'[/?#]')
# Field values: visible ASCII, obs-text, SP and HTAB; no other controls.
_BAD_VALUE_RE = re.compile(rb'[\x00-\x08\x0a-\x1f\x7f]')
_CHUNK_SIZE_RE = re.compile(
    rb'([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*[!#$%&\'*+\-.^_`|~0-9A-Za-z]+'
    rb'(?:[ \t]*=[ \t]*(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+|"(?:[^"\\\r\n]|'
    rb'\\.)*"))?)*')
_KNOWN_CODINGS = frozenset(('gzip', 'x-gzip', 'deflate', 'compress',
                            'identity'))
# Fields a chunked trailer must not carry: they would change the framing.
_FORBIDDEN_TRAILERS = frozenset((b'content-length', b'transfer-encoding',
                                 b'host', b'trailer'))
_NO_BODY_STATUSES = frozenset((204, 304))
# How much of a body the app left unread brim reads past to keep the
# connection for the next request; more, and it closes instead.
_SKIP_LIMIT = 65536
_RECV_SIZE = 65536
# How long, and for how many bytes, a connection brim closes still reads
# what the client sends: enough for it to see the response and stop.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 4 << 20
# How the thread with the turn is watched (see _ConnectionPool): looked at
# every _WATCH_TICK seconds (a look costs the serving thread a GIL round
# trip: rarer looks, cheaper serving); found blocked, the worker's apps
# count as waiting ones for _APPS_WAIT_SECONDS, or until _QUICK_JOBS
# requests in a row, and all for _QUICK_SECONDS, were quicker than
# _WAITED (see _count_quick).  One that keeps the CPU
# busy for _STALL keeps the other connections waiting: the turn passes on
# all the same.
_WATCH_TICK = 0.01
# The least time off the CPU that counts as a request that waited, and
# how often a job served with the turn is timed to see if it waited.
_WAITED = 0.0005
_PROBE_EVERY = 8
_APPS_WAIT_SECONDS = 1.0
_QUICK_JOBS = 64
_QUICK_SECONDS = 0.1
_STALL = 0.01
# A whole answer (its body given at once, up to _HOLD_MAX bytes) that a
# thread with the turn makes for a connection that stays open is held
# back and sent with the turn's other answers: before the turn waits in
# epoll, once _ANSWERS_HELD are held, or once the first of them was begun
# _HOLD_SECONDS ago (so an app that takes longer has its answers sent at
# once).  Each answer sent wakes its client; sent one at a time, a client
# on the same machine takes the CPU back after every one, and both sides
# pay a switch for each request.
_HOLD_MAX = 256 * 1024
_ANSWERS_HELD = 16
_HOLD_SECONDS = 0.001
# Threads beyond those serving end after this long without a turn.
_IDLE_THREAD_SECONDS = 5.0
# Out of file descriptors: parked connections closed per failed accept,
# and with none parked, how long accepting pauses.
_ROOM_PER_SHORTAGE = 8
_ACCEPT_PAUSE = 0.1
# A worker with more than twice the connections a sibling has open, and
# _SPREAD_MARGIN more, takes one new connection per _SPREAD_PAUSE (see
# _Siblings); a sibling silent for _SIBLING_SILENT is left out.
_SPREAD_MARGIN = 8
_SPREAD_PAUSE = 0.001
_SIBLING_SILENT = 2.0


class _HeaderNames(dict):
    """Request field name (bytes) -> WSGI environ key, cached.

    Names with ``_`` map to None and are dropped, so ``Transfer_Encoding``
    cannot pose as ``Transfer-Encoding`` (the CGI mapping merges them).
    """

    def __missing__(self, name):
        if not _TOKEN_RE.fullmatch(name):
            raise _HTTPError(400, 'bad header name %r' % name)
        text = name.decode('ascii').upper()
        if '_' in text:
            key = None
        elif text in ('CONTENT-TYPE', 'CONTENT-LENGTH'):
            key = text.replace('-', '_')
        else:
            key = 'HTTP_' + text.replace('-', '_')
        if len(self) < 512:
            self[name] = key
        return key


_http_date = _DateCache(lambda now: http_date(now))


class _NoBody(object):
    """wsgi.input for a request without a body."""

    expect_continue = False     # there is nothing to ask for

    def read(self, size=-1):
        return b''

    def readline(self, size=-1):
        return b''

    def readlines(self, hint=-1):
        return []

    def __iter__(self):
        return iter(())

    def left_at_most(self, limit):
        return True

    def skip_rest(self, limit):
        return True


_NO_BODY = _NoBody()


class _Input(object):
    """wsgi.input: the request body, read lazily from the connection.

    Subclasses say how the body is framed.  ``read()`` returns b'' at the end
    of the body, never blocking for more, so ``wsgi.input_terminated`` holds.
    ``expect_continue``: the client waits to be asked for the body
    (Expect: 100-continue), until the first read or the response's head.
    """

    def __init__(self, conn):
        self.conn = conn
        self.done = False
        self.consumed = 0      # body bytes read, for the request log
        self.expect_continue = False

    def _next(self, size):
        """Up to ``size`` more body bytes, b'' at the end of the body.  The
        first read is when a client that waits is asked for the body,
        whatever of it is buffered already."""
        if self.expect_continue:
            self.expect_continue = False
            self.conn.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
        return self._read_some(size)

    def _read_some(self, size):
        raise NotImplementedError

    def read(self, size=-1):
        if size is None or size < 0:
            parts = []
            while True:
                part = self._next(_RECV_SIZE)
                if not part:
                    return b''.join(parts)
                parts.append(part)
        parts = []
        while size > 0:
            part = self._next(size)
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b''.join(parts)

    def readline(self, size=-1):
        parts = []
        while size != 0:
            part = self._peek_line(size)
            if not part:
                break
            parts.append(part)
            if size > 0:
                size -= len(part)
            if part.endswith(b'\n'):
                break
        return b''.join(parts)

    def _peek_line(self, size):
        """Up to a newline (or ``size``), consuming only what it returns."""
        part = self._next(size if size > 0 else _RECV_SIZE)
        newline = part.find(b'\n')
        if newline >= 0 and newline + 1 < len(part):
            self._unread(part[newline + 1:])
            part = part[:newline + 1]
        return part

    def readlines(self, hint=-1):
        lines = []
        total = 0
        for line in self:
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def left_at_most(self, limit):
        """True if no more than ``limit`` bytes of the body are left."""
        raise NotImplementedError

    def skip_rest(self, limit):
        """Read and drop what is left; False if more than ``limit`` is."""
        while limit >= 0:
            part = self._next(_RECV_SIZE)
            if not part:
                return True
            limit -= len(part)
        return False


class _LengthInput(_Input):
    """A body framed by Content-Length."""

    def __init__(self, conn, length):
        _Input.__init__(self, conn)
        self.left = length

    def _read_some(self, size):
        if self.left <= 0:
            return b''
        data = self.conn.take(min(size, self.left))
        self.left -= len(data)
        self.consumed += len(data)
        return data

    def _unread(self, data):
        self.conn.untake(data)
        self.left += len(data)
        self.consumed -= len(data)

    def left_at_most(self, limit):
        return self.left <= limit


class _ChunkedInput(_Input):
    """A chunked body, de-chunked; trailers are checked and dropped."""

    def __init__(self, conn, max_body):
        _Input.__init__(self, conn)
        self.left = 0          # bytes left in the current chunk
        self.total = 0
        self.max_body = max_body
        self.pending = b''     # bytes handed back by _unread

    def _read_some(self, size):
        if self.pending:
            data, self.pending = self.pending[:size], self.pending[size:]
            self.consumed += len(data)
            return data
        if self.done:
            return b''
        if self.left == 0:
            self.left = self._chunk_size()
            if self.left == 0:
                self._trailers()
                self.done = True
                return b''
        data = self.conn.take(min(size, self.left))
        self.left -= len(data)
        self.consumed += len(data)
        if self.left == 0:
            if self.conn.read_exact(2) != b'\r\n':
                raise _HTTPError(400, 'chunk data not followed by CRLF')
        return data

    def _unread(self, data):
        self.pending = data + self.pending
        self.consumed -= len(data)

    def left_at_most(self, limit):
        return self.done       # its size is only known at its end

    def _chunk_size(self):
        line = self.conn.read_line(1024)
        match = _CHUNK_SIZE_RE.fullmatch(line)
        if not match:
            raise _HTTPError(400, 'bad chunk size line %r' % line[:64])
        size = int(match.group(1), 16)
        self.total += size
        if self.max_body is not None and self.total > self.max_body:
            raise _HTTPError(413, 'chunked body over max_body')
        return size

    def _trailers(self):
        for _ in range(100):
            line = self.conn.read_line(8192)
            if not line:
                return
            name, colon, value = line.partition(b':')
            if (not colon or not _TOKEN_RE.fullmatch(name) or
                    _BAD_VALUE_RE.search(value)):
                raise _HTTPError(400, 'bad trailer field %r' % line[:64])
            if name.lower() in _FORBIDDEN_TRAILERS:
                raise _HTTPError(400, 'forbidden trailer field %r' % name)
        raise _HTTPError(431, 'too many trailer fields')


class _FileWrapper(object):
    """wsgi.file_wrapper: lets the server send a file with os.sendfile."""

    def __init__(self, filelike, blksize=65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, 'close'):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data


class _ErrorStream(object):
    """wsgi.errors: what an app writes here is logged at ERROR."""

    def __init__(self, logger):
        self.logger = logger

    def write(self, text):
        for line in str(text).splitlines():
            if line.strip():
                self.logger.error('wsgi.errors: %s', line)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass


# Everything but visible ASCII (and %) is quoted; NUL separates the words
# while the whole line is quoted in one pass.
_UNSAFE_LOG_RE = re.compile('[\x01-\x20\x7f-\U0010ffff%]')


def _percent(match):
    return ''.join('%%%02X' % b for b in match.group().encode('utf-8'))


def _log_words(words):
    """``words`` as one log line: each a space-free word, '-' if empty.

    A client controls most of these words; quoting them means a line can
    never be broken or forged.
    """
    line = '\0'.join([str(w).replace('\0', '%00') if w else '-'
                      for w in words])
    return _UNSAFE_LOG_RE.sub(_percent, line).replace('\0', ' ')


class _RequestParser(object):
    """Reads a request's head (the bytes up to the blank line) into its
    _Request, or refuses it (_HTTPError), by RFC 9112 and the limits."""

    __slots__ = ('limits',)

    #: Field names as environ keys, learned as they come (see _HeaderNames).
    NAMES = _HeaderNames()

    def __init__(self, limits):
        self.limits = limits

    def parse(self, head, conn):
        """The _Request ``head`` asks for; its body reads from ``conn``."""
        limits = self.limits
        lines = head.split(b'\r\n')
        request_line = lines[0]
        if len(request_line) > limits.max_request_line:
            raise _HTTPError(414, 'request line over max_request_line')
        parts = request_line.split(b' ')
        if len(parts) != 3:
            raise _HTTPError(400, 'malformed request line %r'
                             % request_line[:100])
        method, target, version = parts
        if method not in _KNOWN_METHODS and not _METHOD_RE.fullmatch(method):
            raise _HTTPError(400, 'bad method %r' % method[:30])
        if version == b'HTTP/1.1':
            http11 = True
        elif version == b'HTTP/1.0':
            http11 = False
        elif _VERSION_RE.fullmatch(version):
            raise _HTTPError(505, 'unsupported version %r' % version)
        else:
            raise _HTTPError(400, 'bad version %r' % version[:30])
        env = conn.base_env.copy()
        env['REQUEST_METHOD'] = method.decode('ascii')
        env['SERVER_PROTOCOL'] = version.decode('ascii')
        self._target(env, method, target)
        if len(lines) - 1 > limits.max_header_count:
            raise _HTTPError(431, 'more than max_header_count fields')
        codings = self._fields(env, lines)
        return self._request(env, codings, http11, conn)

    def _target(self, env, method, target):
        if target[:1] == b'/':
            if not _TARGET_RE.fullmatch(target):
                raise _HTTPError(400, 'bad request target')
            path = target
        elif (target[:7].lower() == b'http://' or
                target[:8].lower() == b'https://'):
            if not _TARGET_RE.fullmatch(target):
                raise _HTTPError(400, 'bad request target')
            rest = target.split(b'://', 1)[1]
            # The authority ends at the path, the query or the fragment,
            # and the path may be empty: "http://host?q" asks for /?q.
            end = _AUTHORITY_END_RE.search(rest)
            end = end.start() if end else len(rest)
            authority = rest[:end]
            if not authority or not _AUTHORITY_RE.fullmatch(authority):
                raise _HTTPError(400, 'bad absolute-form target')
            path = rest[end:]
            if path[:1] != b'/':
                path = b'/' + path
        elif target == b'*' and method == b'OPTIONS':
            path = b'*'
        elif method == b'CONNECT' and _AUTHORITY_RE.fullmatch(target):
            path = b''
        else:
            raise _HTTPError(400, 'bad request target %r' % target[:100])
        path = path.split(b'#', 1)[0]
        path, _, query = path.partition(b'?')
        if b'%' in path:
            path = unquote_to_bytes(path)
            if b'\0' in path:
                raise _HTTPError(400, 'NUL in the path')
        env['PATH_INFO'] = path.decode('latin-1')
        env['QUERY_STRING'] = query.decode('latin-1')
        env['RAW_URI'] = target.decode('latin-1')

    def _fields(self, env, lines):
        """Put the fields in ``lines`` (after the request line) in ``env``;
        the Transfer-Encoding codings, or None."""
        max_line = self.limits.max_header_line - 2  # the limit counts CRLF
        names = self.NAMES
        codings = None
        for line in itertools.islice(lines, 1, None):
            if len(line) > max_line:
                raise _HTTPError(431, 'a header line over max_header_line')
            colon = line.find(b':')
            if colon <= 0:
                raise _HTTPError(400, 'header line without a name: %r'
                                 % line[:64])
            key = names[line[:colon]]
            value = line[colon + 1:].strip(b' \t')
            if _BAD_VALUE_RE.search(value):
                raise _HTTPError(400, 'control character in header %r'
                                 % line[:colon])
            if key is None:
                continue
            value = value.decode('latin-1')
            if key in env:
                if key in ('CONTENT_LENGTH', 'HTTP_HOST', 'CONTENT_TYPE'):
                    raise _HTTPError(400, 'duplicate %s' % key)
                env[key] += ',' + value
            else:
                env[key] = value
            if key == 'HTTP_TRANSFER_ENCODING':
                codings = env[key]
        return codings

    def _request(self, env, codings, http11, conn):
        """The _Request of ``env``: whether it keeps the connection, and
        its body, framed as its fields say."""
        connection = env.get('HTTP_CONNECTION', '').lower()
        if http11:
            keep_alive = 'close' not in connection
        else:
            keep_alive = 'keep-alive' in connection
        length = env.get('CONTENT_LENGTH')
        if codings is not None:
            body = self._chunked(codings, length, http11, conn)
        elif length is not None:
            if not length.isdigit() or not length.isascii():
                raise _HTTPError(400, 'bad Content-Length %r' % length)
            size = int(length)
            max_body = self.limits.max_body
            if max_body is not None and size > max_body:
                raise _HTTPError(413, 'Content-Length over max_body')
            body = _LengthInput(conn, size) if size else _NO_BODY
        else:
            body = _NO_BODY
        if (body is not _NO_BODY and http11 and
                env.get('HTTP_EXPECT', '').lower() == '100-continue'):
            body.expect_continue = True
        env['wsgi.input'] = body
        return _Request(env, keep_alive, body)

    def _chunked(self, codings, length, http11, conn):
        """Check Transfer-Encoding; the de-chunking wsgi.input."""
        if length is not None:
            raise _HTTPError(400, 'both Content-Length and '
                             'Transfer-Encoding (request smuggling)')
        if not http11:
            raise _HTTPError(400, 'Transfer-Encoding in an HTTP/1.0 request')
        listed = [c.strip(' \t').lower() for c in codings.split(',')]
        if listed[-1] != 'chunked' or listed.count('chunked') != 1:
            raise _HTTPError(400, 'Transfer-Encoding %r does not end with '
                             'one chunked' % codings)
        for coding in listed[:-1]:
            if coding not in _KNOWN_CODINGS:
                raise _HTTPError(501, 'unknown transfer coding %r' % coding)
        return _ChunkedInput(conn, self.limits.max_body)


class _ClientSocket(object):
    """A client's socket, for a thread that may hold the worker's turn.

    A plain one is non-blocking: a read or write that would wait says so
    and brim waits itself (poll), where a socket timeout would make every
    read and write a poll and a call; between requests it is parked in
    the pool's epoll.  TLS may hold decrypted bytes that epoll cannot
    see: it blocks, with a timeout.  Before a wait on the client, the
    turn (``turn``, a _Turn, while this thread has it) passes on.
    """

    def __init__(self, sock, plain, timeout):
        self.sock = sock
        self.plain = plain
        self.timeout = timeout  # for a wait on the client
        self.turn = None
        self.poll = None        # made when first needed
        # The last read filled its buffer: more may wait unread, of which
        # an edge-triggered epoll says nothing (see _OpenConnections.park).
        self.filled = False

    def recv(self):
        """More bytes from the client; raises EOFError when it closed."""
        data = self.recv_or_eof()
        if not data:
            raise EOFError
        return data

    def recv_or_eof(self):
        """What the client sent next, b'' if it closed."""
        while True:
            try:
                return self._recv_some()
            except BlockingIOError:     # plain, and nothing there yet
                self.wait_for_client(select.POLLIN)

    def sendall(self, data):
        """Send all of ``data``."""
        if not self.plain:
            return self.sock.sendall(data)
        data = memoryview(data)
        while data:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:     # the client reads slower
                self.wait_for_client(select.POLLOUT)

    def sendfile(self, file, offset, size):
        """Send ``size`` bytes of ``file`` from ``offset``: the bytes sent,
        0 at the file's end."""
        if not self.plain:
            return self.sock.sendfile(file, offset, size)
        while True:
            try:
                return os.sendfile(self.sock.fileno(), file.fileno(), offset,
                                   size)
            except BlockingIOError:
                self.wait_for_client(select.POLLOUT)

    def wait_for_client(self, event):
        """Wait, up to ``timeout``, until the plain socket can be read
        (POLLIN) or written (POLLOUT); socket.timeout if it cannot.  This
        thread's turn passes on first: the others must not wait too."""
        if self.turn is not None:
            self.turn.pass_on()
            self.turn = None
        if not self.ready(event, self.timeout):
            raise socket.timeout('timed out')

    def ready(self, event, timeout):
        """True once the socket can be read (POLLIN) or written (POLLOUT),
        within ``timeout`` seconds."""
        if self.poll is None:
            self.poll = select.poll()
            self.poll.register(self.sock, event)
        else:
            self.poll.modify(self.sock, event)
        return bool(self.poll.poll(timeout * 1000))

    def arrived(self):
        """True if a read will not wait."""
        return self.ready(select.POLLIN, 0)

    def read_arrived(self):
        """What a new client has sent already (None: nothing yet, b'': it
        closed), taken without waiting."""
        self.sock.setblocking(False)
        return self.read_now()

    def read_now(self):
        """What the non-blocking socket has (None: nothing, b'': the
        client closed)."""
        try:
            return self._recv_some()
        except BlockingIOError:
            return None

    def _recv_some(self):
        """One recv, noting whether it filled its buffer."""
        data = self.sock.recv(_RECV_SIZE)
        self.filled = len(data) == _RECV_SIZE
        return data


def _trusted_peer(networks, address):
    """Whether the peer at ``address`` (from accept) is in ``networks``.
    A peer with no (ip, port), on a Unix socket, is a local one: trusted."""
    if not isinstance(address, tuple) or not address or not address[0]:
        return True
    try:
        ip = ipaddress.ip_address(address[0].partition('%')[0])
    except ValueError:
        return False
    ip = getattr(ip, 'ipv4_mapped', None) or ip
    return any(ip in network for network in networks)


def _forwarded_pairs(value):
    """The last element of a Forwarded header (RFC 7239), the one the
    proxy next to brim added, as {name: value}."""
    pairs = {}
    for pair in value.rpartition(',')[2].split(';'):
        name, _, text = pair.partition('=')
        pairs[name.strip().lower()] = text.strip().strip('"')
    return pairs


def _forwarded_host(text):
    """The address of a forwarded for= or X-Forwarded-For entry, without a
    port: '[2001:db8::1]:80' is '2001:db8::1', '192.0.2.1:80' '192.0.2.1'."""
    text = text.strip()
    if text.startswith('['):
        return text[1:].partition(']')[0]
    if text.count(':') == 1:
        return text.partition(':')[0]
    return text


_FORWARDED_KEYS = frozenset((
    'HTTP_FORWARDED', 'HTTP_X_FORWARDED_PROTO', 'HTTP_X_FORWARDED_PROTOCOL',
    'HTTP_X_FORWARDED_SSL', 'HTTP_X_FORWARDED_FOR'))


def _believe_proxy(env):
    """Set the scheme and client address a trusted proxy forwarded.

    X-Forwarded-For may list every proxy on the way; only its right-most
    entry is the one the proxy next to brim added, and only that proxy is
    trusted, so only that entry is believed.  REMOTE_ADDR stays the peer's.
    """
    if _FORWARDED_KEYS.isdisjoint(env):
        return      # the common case, even from a proxy: cheaply
    forwarded = env.get('HTTP_FORWARDED')
    pairs = _forwarded_pairs(forwarded) if forwarded else {}
    scheme = (env.get('HTTP_X_FORWARDED_PROTO') or
              env.get('HTTP_X_FORWARDED_PROTOCOL') or pairs.get('proto'))
    if scheme:
        scheme = scheme.rpartition(',')[2].strip().lower()
    elif env.get('HTTP_X_FORWARDED_SSL', '').lower() == 'on':
        scheme = 'https'
    if scheme == 'https':
        env['wsgi.url_scheme'] = 'https'
        env['HTTPS'] = 'on'
    elif scheme == 'http':
        env['wsgi.url_scheme'] = 'http'
        env.pop('HTTPS', None)
    client = env.get('HTTP_X_FORWARDED_FOR') or pairs.get('for')
    if client:
        client = _forwarded_host(client.rpartition(',')[2])
        if client:
            env['brim.client_addr'] = client


class _ProxyError(Exception):
    """A PROXY header that is not one; the text says what is wrong."""


_PROXY_V2_SIGNATURE = b'\r\n\r\n\0\r\nQUIT\n'
_PROXY_V1_MAX = 107         # the longest v1 line, by the specification
_PROXY_V2_MAX = 16 + 2048   # addresses and more TLVs than proxies send
_PROXY_V2_ADDRESSES = {0x1: (socket.AF_INET, 4), 0x2: (socket.AF_INET6, 16)}


def _proxy_header(buf):
    """(need, address) for ``buf``, the first bytes of a connection.

    ``need`` > 0: read that many bytes more, and no more (they may all be
    the header's; the bytes after it are the client's).  0: ``buf`` is a
    whole header, and ``address`` the client's (ip, port), None for v1
    UNKNOWN and v2 LOCAL (a proxy's own check: the peer's address).
    Raises _ProxyError at the first byte that cannot be a header's.
    """
    if not buf:
        return 15, None     # "PROXY UNKNOWN\r\n", the shortest header
    if buf[:12] == _PROXY_V2_SIGNATURE[:len(buf)]:
        if len(buf) < 16:
            return 16 - len(buf), None
        total = 16 + struct.unpack('!H', buf[14:16])[0]
        if total > _PROXY_V2_MAX:
            raise _ProxyError('a v2 header of %d bytes is over %d'
                              % (total, _PROXY_V2_MAX))
        if len(buf) < total:
            return total - len(buf), None
        return 0, _proxy_v2_address(buf)
    if buf[:6] != b'PROXY '[:len(buf)]:
        raise _ProxyError('no PROXY header: %r' % buf[:16])
    if buf.endswith(b'\n'):
        if not buf.endswith(b'\r\n'):
            raise _ProxyError('a v1 header ending in a bare LF')
        return 0, _proxy_v1_address(buf[:-2])
    if len(buf) >= _PROXY_V1_MAX:
        raise _ProxyError('a v1 header over %d bytes' % _PROXY_V1_MAX)
    # Byte by byte past the shortest header: nothing says where the line
    # ends.
    return max(15 - len(buf), 1), None


def _proxy_v1_address(line):
    """The (ip, port) of a v1 line (without its CRLF), None for UNKNOWN."""
    words = line.split(b' ')
    if words[1:2] == [b'UNKNOWN']:
        return None
    if len(words) != 6 or words[1] not in (b'TCP4', b'TCP6'):
        raise _ProxyError('a malformed v1 header: %r' % line[:_PROXY_V1_MAX])
    version = 4 if words[1] == b'TCP4' else 6
    try:
        ips = [ipaddress.ip_address(w.decode('ascii')) for w in words[2:4]]
        ports = [int(w) for w in words[4:6] if w.isdigit()]
    except (UnicodeDecodeError, ValueError):
        ips, ports = [], []
    if (len(ports) != 2 or max(ports) > 65535 or
            [ip.version for ip in ips] != [version, version]):
        raise _ProxyError('bad addresses in a v1 header: %r'
                          % line[:_PROXY_V1_MAX])
    return str(ips[0]), ports[0]


def _proxy_v2_address(header):
    """The source (ip, port) of a whole v2 header, None for LOCAL and for
    families without one (UNSPEC, UNIX).  TLVs are skipped."""
    version, command = header[12] >> 4, header[12] & 0xF
    if version != 2 or command > 1:
        raise _ProxyError('a v2 header of version %d, command %d'
                          % (version, command))
    if command == 0:        # LOCAL
        return None
    family = _PROXY_V2_ADDRESSES.get(header[13] >> 4)
    if family is None:
        if header[13] >> 4 in (0x0, 0x3):   # UNSPEC, UNIX
            return None
        raise _ProxyError('a v2 header of family %#x' % (header[13] >> 4))
    family, size = family
    body = header[16:]
    if len(body) < 2 * size + 4:
        raise _ProxyError('a v2 header too short for its addresses')
    ip = socket.inet_ntop(family, body[:size])
    return ip, struct.unpack('!H', body[2 * size:2 * size + 2])[0]


def _read_proxy_header(sock, timeout):
    """Read a PROXY header from ``sock`` (its own bytes, not one more); the
    client's (ip, port), or None: the peer's own.  socket.timeout after
    ``timeout`` seconds, all told; _ProxyError for a bad header."""
    deadline = time.monotonic() + timeout
    buf = b''
    while True:
        need, address = _proxy_header(buf)
        if not need:
            return address
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('timed out')
        sock.settimeout(left)
        # The plain socket's recv, also under TLS: the header comes before
        # the handshake.
        data = socket.socket.recv(sock, need)
        if not data:
            raise _ProxyError('closed before the header ended'
                              if buf else 'closed before a header')
        buf += data


class _HTTPConnection(_ClientSocket):
    """One client connection: reads requests and answers them in turn.

    Per-connection state is kept here and reused for every request on the
    connection, so keep-alive requests create little garbage; a request's
    own is its _Request's.  ``site`` (an _HTTPSite) is all it sees of the
    worker.
    """

    def __init__(self, site, sock, address, peer=None):
        self.site = site
        self.parser = site.parser
        self.limits = site.parser.limits
        self.logger = site.logger
        self.draining = site.draining
        _ClientSocket.__init__(self, sock, not site.tls,
                               self.limits.client_timeout)
        self.fresh = True       # no read yet (nor the socket's timeout)
        self.parkable = self.plain
        self.buf = b''
        self.client = address[0] if address else '-'
        self.base_env = site.base_env.copy()
        self.base_env['REMOTE_ADDR'] = self.client
        self.base_env['REMOTE_PORT'] = str(address[1]) if address else ''
        self.base_env['brim.client_addr'] = self.client
        # Trust is the peer's (the proxy's, under the PROXY protocol),
        # decided once: a connection from anyone else reads no header.
        self.trusted = site.forwarded_allow is not None and _trusted_peer(
            site.forwarded_allow, address if peer is None else peer)
        self.current = None     # (start, txn, method, path) being served
        # Idle means between keep-alive requests: a drain may close it then.
        # A new connection is not idle: its first request is always served.
        self.idle = False
        self.closing = False    # a drain is closing it (see _serve_requests)
        self.served = 0         # requests begun on this connection
        # The last answer, held back for the pool to send (see _HOLD_MAX):
        # the connection is idle only once it is sent.
        self.unsent = None
        self.armed = None       # what the pool's epoll waits for (park)

    # -- reading -----------------------------------------------------------

    def take(self, size):
        """Up to ``size`` body bytes: buffered ones first, else one recv."""
        if not self.buf:
            self.receive_body()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def untake(self, data):
        self.buf = data + self.buf

    def receive_body(self):
        """Add the next bytes the client sends of the body to the buffer.

        Readers take from the buffer; only this adds to it, so a line or a
        CRLF split across two reads is put together, never read twice.
        """
        try:
            self.buf += self.recv()
        except EOFError:
            raise _HTTPError(400, 'client closed inside the body')

    def read_exact(self, size):
        data = b''
        while len(data) < size:
            data += self.take(size - len(data))
        return data

    def read_line(self, limit):
        """A CRLF-terminated line (without it) of at most ``limit`` bytes."""
        while True:
            buf = self.buf
            end = buf.find(b'\r\n')
            # Too long is too long whether the line's end has come or not.
            if (end if end >= 0 else len(buf) - buf.endswith(b'\r')) > limit:
                raise _HTTPError(400, 'chunk line too long')
            if end >= 0:
                line, self.buf = buf[:end], buf[end + 2:]
                if b'\n' in line or b'\r' in line:
                    raise _HTTPError(400, 'bare CR or LF in a chunk line')
                return line
            self.receive_body()

    def read_head(self):
        """The bytes of the next request's head, or None at a clean end.

        Refuses a head that breaks the limits as soon as it does, so a
        client cannot make brim buffer more than the limits allow.
        """
        limits = self.limits
        buf = self.buf
        while True:
            end = buf.find(b'\r\n\r\n')
            if end >= 0:
                head, self.buf = buf[:end], buf[end + 4:]
                if head.startswith(b'\r\n'):     # one stray CRLF is allowed
                    head = head[2:]
                if (head.count(b'\n') != head.count(b'\r\n') or
                        head.count(b'\r') != head.count(b'\r\n')):
                    raise _HTTPError(400, 'bare CR or LF in the head')
                return head
            if buf.count(b'\n') != buf.count(b'\r\n'):
                raise _HTTPError(400, 'bare LF in the head')
            first = buf.find(b'\r\n', 2)
            if ((first < 0 and len(buf) > limits.max_request_line + 2) or
                    first > limits.max_request_line + 2):
                raise _HTTPError(414, 'request line over max_request_line')
            if len(buf) > limits.max_head:
                raise _HTTPError(431, 'request head over the header limits')
            try:
                data = self.recv_or_eof()
            except socket.timeout:
                if buf:
                    raise _HTTPError(408, 'client timed out sending a head')
                return None
            if not data:
                if buf.strip():
                    raise _HTTPError(400, 'client closed inside the head')
                return None
            self.idle = False
            buf += data
            self.buf = buf

    # -- serving -----------------------------------------------------------

    def serve(self, turn=None):
        """Answer requests until the client or brim ends the connection, or
        until it idles between requests: then it returns itself, to be
        parked in the pool's epoll until the next request comes.

        ``turn``: this thread has the worker's turn to accept and serve
        (a _Turn), to pass on before it waits on the client or on an app
        that waits.
        """
        self.turn = turn
        try:
            if self.fresh and turn is not None:     # from the accept
                self.fresh = False
                data = self.read_arrived()
            elif turn is not None and self.parkable:    # from epoll
                data = self.read_now()
            else:
                return self._serve_requests()
            if data is None:
                return self     # nothing yet: parked until it comes
            if not data:
                return self.close()
            self.buf = data
            return self._serve_requests()
        except (OSError, EOFError):
            # The client went away or timed out: nothing to say.
            return self.close()
        except BaseException:
            self.close()
            raise

    def _serve_requests(self):
        """serve()'s loop: a request at a time, while the client sends."""
        while True:
            try:
                head = self.read_head()
                if head is None:
                    return self.close()
                self.idle = False   # a pipelined head needs no recv
                if self.closing:
                    # A drain shut the connection down as it idled, and a
                    # request came in at that moment: not served, so a
                    # client that retries it on a new connection does not
                    # have it run twice.  (The drain sets closing, then
                    # reads idle; this thread the other way round: one of
                    # the two sees the other's store.)
                    return self.close()
                self.served += 1
                request = self.parser.parse(head, self)
            except _HTTPError as err:
                self.refuse(err)
                return self.linger()
            if self.trusted:
                _believe_proxy(request.env)
            if self.turn is not None and self.turn.before_app():
                self.turn = None
            if not self.respond(request):
                return self.hang_up(request.body)
            if self.parkable and not self.buf:
                self.idle = self.unsent is None
                return self     # the pool sends what it holds, then parks it
            self.send_unsent()  # pipelined: answered before the next is read
            self.idle = True

    def close(self):
        """Close the connection (for good); returns None."""
        self.site.connections.discard(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def hang_up(self, body):
        """Close after a response that ends the connection; returns None.

        The client may still be sending (the rest of ``body``, the next
        request): then brim lingers before it closes.
        """
        self.send_unsent()
        if self.buf or not body.left_at_most(0) or self.arrived():
            return self.linger()
        return self.close()

    def linger(self):
        """Close, letting the client read the response first; returns None.

        Closing a socket with unread input makes the kernel reset the
        connection, and a reset can destroy the response before the client
        has read it.  So brim stops sending, then reads and drops what
        comes until the client closes too, for at most _LINGER_SECONDS and
        _LINGER_BYTES, as Apache and nginx do.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            left = _LINGER_BYTES
            while left > 0:
                self.timeout = deadline - time.monotonic()
                if self.timeout <= 0:
                    break
                if not self.plain:
                    self.sock.settimeout(self.timeout)
                data = self.recv_or_eof()
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass        # gone already, or too slow to close: close now
        return self.close()

    def refuse(self, err):
        """Answer a request brim will not serve, then close."""
        self.logger.warning('%s refused %s: %s', self.client, err.status,
                            err.reason)
        try:
            _Response(self, _UNPARSED).answer(err.status)
        except OSError:
            pass
        self.site.refused(err.status)

    def respond(self, request):
        """Run the app for ``request`` and answer; True to keep the
        connection."""
        site = self.site
        env = request.env
        response = _Response(self, request)
        serving = _log_lines.serving
        serving.txn = txn = env['brim.txn'] = site.next_txn()
        env['brim.start'] = start = time.time()
        env['brim.log_info'] = []
        method, path = env['REQUEST_METHOD'], env['PATH_INFO']
        self.current = (start, txn, method, path)
        site.began(start, txn, method, path, self.served == 1)
        keep = False
        try:
            keep = response.run(site.app)
            if keep:
                keep = self._finish_body(request.body)
        finally:
            # Also when the client went away mid-request: what began ends.
            site.ended(env, response, time.time() - start, txn)
            serving.txn = None
            self.current = None
        return keep and not self.draining()

    def send_answer(self, data, keep_alive):
        """Send a whole answer; hold it back (see _HOLD_MAX) when the
        connection stays open and this thread has the turn."""
        if (keep_alive and self.turn is not None and self.parkable and
                len(data) <= _HOLD_MAX):
            self.unsent = data
        else:
            self.sendall(data)

    def send_unsent(self):
        """Send the answer held back, if any, waiting as the client reads."""
        data, self.unsent = self.unsent, None
        if data is not None:
            self.sendall(data)

    def try_send_unsent(self):
        """The pool's: send as much of the answer held back as the client
        takes at once; True when all of it is sent (the connection idles
        then)."""
        data = self.unsent
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return False
        if sent < len(data):
            self.unsent = memoryview(data)[sent:]     # no copy
            return False
        self.unsent = None
        self.idle = True
        return True

    def reusable(self, body):
        """Whether the connection can take a request after the response
        that is starting (its head says so): brim must know where the
        next request begins, and read no more than _SKIP_LIMIT of
        ``body`` to get there."""
        if self.draining():
            return False
        if body.expect_continue:
            # Expect: 100-continue and the app read none of the body: the
            # client, told nothing, may send it or not, so the connection
            # has no sure next request.
            return False
        return body.left_at_most(_SKIP_LIMIT)

    def _finish_body(self, body):
        """Drop what the app left of the body so the next request parses."""
        try:
            return body.skip_rest(_SKIP_LIMIT)
        except _HTTPError:
            return False


# The request a refusal answers: brim could not parse it.
_UNPARSED = _Request({'REQUEST_METHOD': '', 'SERVER_PROTOCOL': 'HTTP/1.1'},
                     False, _NO_BODY)


class _Response(object):
    """One response: start_response, write, and sending the app's body."""

    def __init__(self, conn, request):
        self.conn = conn
        self.body = request.body
        self.env = env = request.env
        self.status = None
        self.headers = None
        self.code = 0
        self.head_sent = False
        self.chunked = False
        self.length = None      # Content-Length the app gave, if any
        self.sent = 0           # body bytes sent
        self.keep_alive = request.keep_alive
        self.head_only = env['REQUEST_METHOD'] == 'HEAD'

    def bytes_in(self):
        """Body bytes read from the client for this request, whatever
        middleware put in env['wsgi.input'] since."""
        return getattr(self.body, 'consumed', 0)

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise _AppError('called start_response twice without exc_info')
        if (type(status) is not str or len(status) < 4 or
                not status[:3].isdigit() or status[3:4] != ' '):
            raise _AppError('gave start_response a status of %r; it must '
                            'be a str like "200 OK"' % (status,))
        if type(headers) is not list:
            raise _AppError('gave start_response headers of type %s; they '
                            'must be a list of (str, str) tuples'
                            % type(headers).__name__)
        for header in headers:
            if (type(header) is not tuple or len(header) != 2 or
                    type(header[0]) is not str or type(header[1]) is not str):
                raise _AppError('gave start_response the header %r; headers '
                                'must be (str, str) tuples' % (header,))
            if ('\n' in header[1] or '\r' in header[1] or
                    not _FIELD_NAME_RE.fullmatch(header[0])):
                raise _AppError('gave start_response the header %r; a name '
                                'is a token and a value has no CR or LF'
                                % (header,))
        self.status = status
        self.headers = headers
        self.code = int(status[:3])
        return self.write

    def _head(self, body_length):
        """The response head as bytes, deciding the body's framing."""
        lines = ['HTTP/1.1 ', self.status, '\r\n']
        self._app_fields(lines)
        self._framing(lines, body_length)
        self._connection(lines)
        lines.append('\r\n')
        try:
            return ''.join(lines).encode('latin-1')
        except UnicodeEncodeError:
            raise _AppError('sent a header that is not latin-1 text')

    def _app_fields(self, lines):
        """Add the app's fields to ``lines``, but those brim decides
        (Connection, Transfer-Encoding); Date and Server unless the app
        sent them."""
        has_date = has_server = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == 'content-length':
                try:
                    self.length = int(value)
                except ValueError:
                    raise _AppError('sent Content-Length %r' % value)
            elif lower == 'connection':
                if value.lower() == 'close':
                    self.keep_alive = False
                continue
            elif lower == 'transfer-encoding':
                continue        # brim frames the body itself
            elif lower == 'date':
                has_date = True
            elif lower == 'server':
                has_server = True
            lines.extend((name, ': ', value, '\r\n'))
        if not has_date:
            lines.extend(('Date: ', _http_date(), '\r\n'))
        if not has_server:
            lines.append('Server: brim\r\n')

    def _framing(self, lines, body_length):
        """How the body's end will show: its length (given, or the whole
        body's), chunks, or the connection's close."""
        code = self.code
        if code < 200 or code in _NO_BODY_STATUSES:
            pass
        elif self.length is not None:
            pass
        elif body_length == 0 and self.head_only:
            # An app may answer HEAD with no body at all (GET's would be
            # made as it is sent): that says nothing of GET's size, which
            # RFC 9110 9.3.2 lets go unsaid, so brim makes up none.
            pass
        elif body_length is not None:
            self.length = body_length
            lines.extend(('Content-Length: ', str(body_length), '\r\n'))
        elif self.env['SERVER_PROTOCOL'] == 'HTTP/1.1':
            self.chunked = not self.head_only
            lines.append('Transfer-Encoding: chunked\r\n')
        else:
            self.keep_alive = False     # HTTP/1.0: the close ends the body

    def _connection(self, lines):
        """Whether the connection stays open after this response."""
        body = self.body
        if self.keep_alive and not self.conn.reusable(body):
            self.keep_alive = False
        # The final response is on its way: a 100 (Continue) for a body the
        # app reads from now on would land in the middle of it.
        if body.expect_continue:
            body.expect_continue = False
        if not self.keep_alive:
            lines.append('Connection: close\r\n')
        elif self.env['SERVER_PROTOCOL'] == 'HTTP/1.0':
            lines.append('Connection: keep-alive\r\n')

    def write(self, data):
        """The WSGI write() callable (and how iterables are sent)."""
        if self.status is None:
            raise _AppError('called write() before start_response')
        if type(data) is not bytes:
            raise _AppError('wrote a %s; WSGI bodies are bytes'
                            % type(data).__name__)
        out = b''
        if not self.head_sent:
            out = self._head(None)
            self.head_sent = True
        if data and not self.head_only:
            self.sent += len(data)
            if self.chunked:
                out += b'%x\r\n%s\r\n' % (len(data), data)
            else:
                out += data
        if out:
            self.conn.sendall(out)

    def _send_whole(self, body):
        """Head and a body known in full, in one send."""
        head = self._head(len(body))
        self.head_sent = True
        if (self.head_only or self.code < 200 or
                self.code in _NO_BODY_STATUSES):
            body = b''
        self.sent = len(body)
        self.conn.send_answer(head + body, self.keep_alive)

    def _send_file(self, wrapper):
        """A wsgi.file_wrapper body, through os.sendfile when it can."""
        try:
            fileno = wrapper.filelike.fileno()
            offset = wrapper.filelike.tell()
            size = os.fstat(fileno).st_size - offset
        except (AttributeError, OSError, io.UnsupportedOperation):
            return self._send_iterable(wrapper)
        head = self._head(size)
        self.head_sent = True
        self.conn.sendall(head)
        if self.head_only:
            return
        if self.length is not None:
            size = min(size, self.length)
        while size > 0:
            sent = self.conn.sendfile(wrapper.filelike, offset, size)
            if not sent:
                break
            offset += sent
            size -= sent
            self.sent += sent

    def _send_iterable(self, result):
        write = self.write
        for data in result:
            if data:
                write(data)
            elif type(data) is not bytes:
                raise _AppError('yielded a %s; WSGI bodies are bytes'
                                % type(data).__name__)
        if not self.head_sent:
            if self.status is None:
                raise _AppError('returned without calling start_response')
            self._send_whole(b'')
        elif self.chunked:
            self.conn.sendall(b'0\r\n\r\n')

    def run(self, app):
        """Call the app and send its answer; True to keep the connection."""
        logger = self.conn.logger
        result = None
        try:
            result = app(self.env, self.start_response)
            if self.status is None and type(result) in (list, tuple, bytes):
                raise _AppError('returned without calling start_response')
            if self.head_sent:
                self._send_iterable(result)     # it used write() already
            elif type(result) in (list, tuple):
                try:
                    body = b''.join(result)
                except TypeError:
                    raise _AppError('returned a body that is not all bytes '
                                    '(a str?); WSGI bodies are bytes')
                self._send_whole(body)
            elif type(result) is bytes:
                self._send_whole(result)    # a common slip; serve it
            elif type(result) is _FileWrapper:
                self._send_file(result)
            else:
                self._send_iterable(result)
        except Exception as err:
            return self._fail(err)
        finally:
            close = getattr(result, 'close', None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception('the app\'s close() raised')
        if (self.length is not None and self.sent != self.length and
                not self.head_only):
            logger.error('%s %s: the app said Content-Length %d but sent '
                         '%d bytes; closing the connection',
                         self.env['REQUEST_METHOD'], self.env['PATH_INFO'],
                         self.length, self.sent)
            return False
        return self.keep_alive

    def _fail(self, err):
        """The app raised or misbehaved: log it, answer 500 if we still can."""
        conn = self.conn
        env = self.env
        logger = conn.logger
        if isinstance(err, OSError):
            self.code = self.code or 499
            return False       # the client went away mid-response
        if isinstance(err, HTTPException) and not self.head_sent:
            return self._answer_raised(err)
        if isinstance(err, _HTTPError):
            status, reason = err.status, err.reason
            logger.warning('%s refused %s: %s', conn.client, status, reason)
        elif isinstance(err, _AppError):
            status, reason = 500, 'the app %s' % err
            logger.error('%s %s: %s', env['REQUEST_METHOD'], env['PATH_INFO'],
                         reason)
        else:
            status, reason = 500, 'the app raised'
            logger.exception('%s %s: %s: %s', env['REQUEST_METHOD'],
                             env['PATH_INFO'], reason, _one_line(err))
        self.code = status
        if self.head_sent:
            return False      # too late for a status: cut the response short
        try:
            self.answer(status, ('%s\ntxn %s\n' % (
                _status(status), env.get('brim.txn', '-'))).encode('ascii'))
        except OSError:
            pass
        return False

    def answer(self, code, body=None):
        """Answer with brim's own plain text (see _plain_answer), and end
        the connection."""
        self.status, self.headers, body = _plain_answer(code, body)
        self.code = code
        self.keep_alive = False
        self.length = None
        self._send_whole(body)

    def _answer_raised(self, response):
        """The app raised a brim.http response (``raise HTTPNotFound()``):
        it is the answer, as if the app had returned it."""
        self.status = None
        try:
            body = b''.join(response(self.env, self.start_response))
        except _AppError as err:
            return self._fail(err)      # say what was wrong with it
        self._send_whole(body)
        return self.keep_alive


class _ConnectionPool(object):
    """Threads that take turns to accept connections and serve them.

    One thread at a time has the turn.  It waits in epoll for the listening
    socket and for parked connections (keep-alive ones between requests,
    new ones before their first), and serves whatever is ready itself:
    under the GIL, handing a short request to another thread (a wake-up, a
    context switch, a contended lock) costs more than serving it.  The turn
    passes to an idle thread, or a new one, as soon as its holder would
    wait: on a client in the middle of a request (the job calls
    ``turn.pass_on()``), or on an app.  A watch thread looks at the holder
    every ``_WATCH_TICK``: one that has mostly not run since its job began
    and sleeps now is blocked (on a database, a lock, a socket), so its
    turn passes on at once; waits too short for the watch are found by
    timing every ``_PROBE_EVERY``-th job.  Either way, for the next second
    the worker's apps count as ones that wait (or until its requests are
    quick again: ``_count_quick``): every request passes the turn on
    before its app runs (``turn.before_app()``), each in a thread of its
    own, and the requests of waiting apps run side by side.  Apps that
    only compute are never blocked and keep the no-hand-off path; one
    that computes for ``_STALL`` passes the turn on all the same.  So
    accepting and the other connections never wait long behind one slow
    client or app, and there are only as many threads as requests in hand
    (at most ``limit``, plus the one with the turn); a thread idle for
    ``_IDLE_THREAD_SECONDS`` ends.

    The answers the turn makes whole are held back (``answered``) and
    sent together before the turn waits in epoll, or once
    ``_ANSWERS_HELD`` wait or the first has waited about
    ``_HOLD_SECONDS``, as Redis writes its replies before it sleeps:
    a client woken once finds many answers, and a client on the same
    machine does not take the CPU back after each one.  A connection is
    parked once its answer is sent, so its next request cannot overtake
    it; one whose client cannot take all of it at once is parked until
    it can take more.

    ``handle(sock, address)`` makes a new connection's job: an object with
    ``serve(turn)``, which returns the job to park, or None once the
    connection is closed, ``close()``, ``client``, ``idle`` (true
    between requests: a drain closes it), ``unsent`` (an answer held
    back, sent by ``try_send_unsent()``), ``filled`` (its last read may
    have left bytes unread) and ``armed`` (None; what epoll waits for on
    its socket, the pool's to set).  ``accept()`` returns (sock,
    address), None when there was nothing to take, or _NO_DESCRIPTORS
    when the process is out of file descriptors.  What is open and parked
    is kept by ``conns`` (_OpenConnections), and told to the worker's
    ``siblings`` (_Siblings), which share out new connections.
    """

    def __init__(self, listener, stop_fd, accept, handle, limit,
                 idle_timeout, logger, label, siblings):
        self.listener = listener
        self.stop_fd = stop_fd
        self.accept = accept
        self.handle = handle
        self.logger = logger
        self.lock = threading.Lock()
        self.epoll = select.epoll()
        self.epoll.register(stop_fd, select.EPOLLIN)
        self.conns = _OpenConnections(self.epoll, listener.fileno(), limit,
                                      idle_timeout, logger, label, siblings)
        self.stopping = False
        self.stopped = threading.Event()    # set once the listener is closed
        self.ready = collections.deque()    # jobs to serve, in order
        self.turn = 0               # numbers turns: each passes once
        # (turn, job, _PoolThread, when it began, its CPU time then)
        self.holder = None
        self.holder_serves = threading.Event()
        self.jobs = 0               # served with the turn, for probing
        self.probes_waited = 0      # probes in a row that found a wait
        self.quick_jobs = 0         # in a row, while the apps wait
        self.quick_since = 0.0      # monotonic: the first of them began
        self.idle = []              # _PoolThreads waiting, newest last
        self.unheld = False         # passed, but no thread could take it
        self.apps_wait_until = 0.0  # monotonic: pass the turn before apps
        self.answered = []          # jobs holding an answer back, in order
        self.answered_since = 0.0   # monotonic: the first of them began
        threading.Thread(target=self._watch, daemon=True).start()
        threading.Thread(target=self._run, daemon=True).start()

    # -- the threads -----------------------------------------------------

    def _run(self):
        """Take turns: serve what is ready; when the turn has passed on,
        wait idle until it comes back (or end, idle too long)."""
        me = _PoolThread()
        try:
            self._take_turns(me)
        finally:
            me.close()

    def _take_turns(self, me):
        while True:
            turn = self.turn        # only its holder changes it from here
            job = self._next_job()
            if job is None:
                return              # stopped: no more turns
            if job is _ACCEPT:
                self._accept_waiting()
                continue
            began, ran = time.monotonic(), me.cpu()
            with self.lock:
                self.holder = (turn, job, me, began, ran)
                if not self.holder_serves.is_set():
                    self.holder_serves.set()
            probe = self._probe_start(me)
            hold = _Turn(self, turn)
            job = self._serve(job, hold)
            if probe is not None and self.turn == turn:
                self._probe_end(probe, me.times())
            # Only a job that passed the turn on before its app tells how
            # long the app took.
            ended = time.monotonic() if hold.for_app else None
            if not self._after_job(job, turn, me, began, ended):
                if not self._wait_for_turn(me):
                    return

    def _serve(self, job, hold):
        """The job to park once ``job`` has served with ``hold`` on the
        turn (a _Turn)."""
        try:
            return job.serve(hold)
        except BaseException:   # even sys.exit(): the turn goes on
            self.logger.exception('connection from %s failed', job.client)
            job.close()
            return None

    # Waits too short for the watch to see are found by timing every
    # _PROBE_EVERY-th job served with the turn: a fraction of the cost of
    # timing them all.  Two in a row must have waited: now and then one
    # was kept off the GIL by a thread that the machine left without a
    # CPU, which looks the same.

    def _probe_start(self, me):
        """The thread's times() when this job is to be timed, else None."""
        self.jobs += 1
        if self.jobs % _PROBE_EVERY or self.apps_wait():
            return None
        return me.times()

    def _probe_end(self, probe, ended):
        waited = _waited(probe, ended)
        self.probes_waited = self.probes_waited + 1 if waited else 0
        if self.probes_waited >= 2:
            with self.lock:
                self._apps_wait_from(ended[0])

    def _count_quick(self, began, ended):
        """Lock held, while the apps wait: a job that passed the turn on
        before its app, begun at ``began``, ended at ``ended``.

        A wrong judgement must not last: on a machine short of CPUs the
        watch or the probes can take a thread kept from one for a blocked
        one, and hello world served a thread per request runs at a third
        of its rate.  Jobs over in less than _WAITED cannot have waited;
        once _QUICK_JOBS in a row were, over _QUICK_SECONDS at least, the
        apps no longer count as ones that wait.  Any longer job starts
        the count again: an app whose requests wait now and then keeps
        its judgement (else each time it ended, the next request to wait
        would hold the turn until the watch looked).  (Whether a job that
        took longer waited, or computed, or was kept from the GIL by the
        others, would take more to tell than this costs.)"""
        if ended - began >= _WAITED:
            self.quick_jobs, self.quick_since = 0, ended
            return
        self.quick_jobs += 1
        if (self.quick_jobs >= _QUICK_JOBS and
                ended - self.quick_since >= _QUICK_SECONDS):
            self.apps_wait_until = 0.0

    def _after_job(self, job, turn, me, began, ended=None):
        """Park ``job`` (None: closed), or hold its answer back (the job
        began at ``began``; ``ended``: it passed the turn on before its
        app, and ended then); True when this thread still has the turn,
        else it joins the idle ones."""
        with self.lock:
            if job is None:
                self.conns.closed()
            elif job.unsent is not None:
                self._hold(job, began)
            else:
                self._park(job)
            holds_turn = self.turn == turn or self.unheld
            self.unheld = False
            if holds_turn:
                self.holder = None
            else:
                self.idle.append(me)
                if ended is not None and self.apps_wait():
                    self._count_quick(began, ended)
            send = self.answered and (
                not holds_turn or len(self.answered) >= _ANSWERS_HELD or
                time.monotonic() - self.answered_since >= _HOLD_SECONDS)
        if send:
            self._send_answers()
        return holds_turn

    def _hold(self, job, since):
        """Lock held: ``job``'s answer, begun at ``since``, waits to be
        sent with the others."""
        if not self.answered:
            self.answered_since = since
        self.answered.append(job)

    def _park(self, job):
        """Lock held: wait for ``job``'s next request, or close it if
        the drain began and it is between requests."""
        if self.stopping and job.idle:
            job.close()
            self.conns.closed()
        else:
            self.conns.park(job)

    def _send_answers(self):
        """Send the answers held back (see _HOLD_MAX) and park their
        connections: for the next request, or until the client can take
        the rest of its answer."""
        with self.lock:
            answered, self.answered = self.answered, []
        sent = []
        for job in answered:
            try:
                sent.append(job.try_send_unsent())
            except OSError:     # the client is gone
                sent.append(None)
        with self.lock:
            for job, done in zip(answered, sent):
                if done:
                    self._park(job)
                elif done is None:
                    job.close()
                    self.conns.closed()
                else:
                    self.conns.park(job, select.EPOLLOUT)

    def _wait_for_turn(self, me):
        """An idle thread's wait; False when it is to end instead."""
        if me.wake.acquire(timeout=_IDLE_THREAD_SECONDS):
            return True
        with self.lock:
            if me in self.idle:
                self.idle.remove(me)
                return False
        me.wake.acquire()   # woken as the wait ran out: the turn is its
        return True

    def _watch(self):
        """While the holder serves, look at it every _WATCH_TICK: pass its
        turn on when it is blocked in a job (on a database, a lock, a
        socket), or once it has served one job for _STALL."""
        me = _PoolThread()
        delayed = me.delayed()
        while True:
            self.holder_serves.wait()
            time.sleep(_WATCH_TICK)
            # Kept from a CPU while it held the GIL, the watch itself may
            # have kept the holder waiting: no judging it for that look.
            before, delayed = delayed, me.delayed()
            holder = self.holder
            if holder is None:
                with self.lock:
                    if self.holder is None:
                        self.holder_serves.clear()
                continue
            turn, _job, thread, began, ran = holder
            now = time.monotonic()
            try:
                blocked = (delayed - before < _WATCH_TICK / 4 and
                           thread.blocked(now - began, thread.cpu() - ran))
            except OSError:         # its thread just ended
                continue
            if blocked:
                with self.lock:
                    self._apps_wait_from(now)
                self.pass_turn(turn)
            elif now - began >= _STALL:
                self.pass_turn(turn)

    # -- what the holder serves --------------------------------------------

    def _next_job(self):
        """What the turn's holder serves next: a connection with something
        to read, or _ACCEPT; None once stopped and every connection is
        closed (one served elsewhere may yet be parked)."""
        conns = self.conns
        while True:
            with self.lock:
                while self.ready:
                    job = self.ready.popleft()
                    if job is not _ACCEPT or conns.accepting:
                        return job
                held = bool(self.answered)
                if self.stopping and not conns.open:
                    return None
                timeout = conns.due(time.monotonic())
            if held:
                self._send_answers()    # before the wait, or never
                continue
            _flush_logs()   # lines wait in memory only while work waits
            # At least once a second: a connection parked meanwhile may be
            # the first to be due.
            events = self.epoll.poll(1.0 if timeout is None else timeout)
            with self.lock:
                for fd, _mask in events:
                    if fd == conns.listener_fd:
                        self.ready.append(_ACCEPT)
                    elif fd == self.stop_fd:
                        self._stop()
                    else:
                        job = conns.unpark(fd)
                        if job is None:
                            continue
                        if job.unsent is not None:  # can take more of it
                            self._hold(job, time.monotonic())
                        else:
                            self.ready.append(job)

    def _accept_waiting(self):
        """Accept what waits in the backlog, up to 128 (a burst is not
        taken one per poll, nor does it hold up the parked connections),
        or until this worker has clearly more than a sibling (see
        _Siblings); the new connections join the ready jobs."""
        conns = self.conns
        for _ in range(128):
            with self.lock:
                if not conns.accepting:
                    return
                # Counted first: an accept that begins the drain (at
                # max_requests) must keep the worker until it is served.
                conns.opened()
            taken = self.accept()
            if taken is None or taken is _NO_DESCRIPTORS:
                with self.lock:
                    conns.closed()
                    if taken is _NO_DESCRIPTORS:
                        conns.make_room()
                return
            try:
                job = self.handle(*taken)
            except Exception:       # the turn must go on: accept the next
                self.logger.exception('connection from %s failed',
                                      taken[1][0] if taken[1] else '-')
                taken[0].close()
                with self.lock:
                    conns.closed()
                continue
            with self.lock:
                self.ready.append(job)
                conns.accepted()
                if conns.ahead():
                    conns.pause(_SPREAD_PAUSE)
                    return

    def _stop(self):
        """Lock held: the drain began.  Stop accepting (the port is free
        when every process has closed it) and close idle connections; new
        ones still get their first request answered."""
        if self.stopping:
            return
        self.stopping = True
        self.epoll.unregister(self.stop_fd)     # it stays readable
        self.conns.stop_accepting()
        self.listener.close()
        self.stopped.set()
        self.conns.close_idle()

    # -- passing the turn --------------------------------------------------

    def pass_turn(self, turn):
        """Give turn ``turn`` to another thread, if it has not passed yet."""
        with self.lock:
            if self.turn != turn:
                return
            self.turn += 1
            self.holder = None
            if self.idle:
                self.idle.pop().wake.release()  # the newest: stack warm
                return
            try:
                threading.Thread(target=self._run, daemon=True).start()
            except RuntimeError as err:     # out of threads: pids.max
                self.logger.error('cannot start a thread (%s); the next '
                                  'request to end takes the turn', err)
                self.unheld = True

    def apps_wait(self):
        """True while the worker's apps are known to wait."""
        return time.monotonic() < self.apps_wait_until

    def _apps_wait_from(self, now):
        """Lock held: a job was found waiting at ``now``: the worker's apps
        count as ones that wait for _APPS_WAIT_SECONDS, or until jobs are
        quick again (_count_quick)."""
        self.apps_wait_until = now + _APPS_WAIT_SECONDS
        self.quick_jobs, self.quick_since = 0, now
        self.probes_waited = 0      # two more in a row to judge again


class _OpenConnections(object):
    """A worker's connections, counted, and parked in its pool's epoll
    between requests; its pool's lock is held around every call.

    At most ``limit`` connections are open at once: then the worker stops
    accepting and new ones wait in the backlog.  Parked ones are closed
    after ``idle_timeout`` seconds.  When the process is out of file
    descriptors, the oldest parked connections are closed to make room,
    as nginx does, or accepting pauses while none is parked.  How many
    are open is told to the worker's ``siblings`` (a _Siblings).
    """

    def __init__(self, epoll, listener_fd, limit, idle_timeout, logger,
                 label, siblings):
        self.epoll = epoll
        self.listener_fd = listener_fd      # kept: closed, it is -1
        epoll.register(listener_fd, select.EPOLLIN)
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.logger = logger
        self.label = label          # names the worker in log lines
        self.siblings = siblings
        self.open = 0               # connections open: served or parked
        self.parked = collections.OrderedDict()     # fd -> (job, since)
        self.edges = set()          # fds whose edge came while out (park)
        self.accepting = True
        self.stopped = False        # no more accepting, ever
        self.paused_until = 0.0     # monotonic: no accepting till then
        self.fd_shortage = None     # [open when it began, closed since]
        siblings.tell(0)            # seen as accepting from the start

    def opened(self):
        self.open += 1
        self._room_changed()

    def accepted(self):
        """A connection opened() was accepted."""
        if self.fd_shortage is not None:
            self._shortage_over()

    def closed(self):
        self.open -= 1
        self._room_changed()

    def park(self, job, event=select.EPOLLIN):
        """Wait in epoll for ``job``'s connection to be readable (or
        writable: EPOLLOUT).

        A connection is registered edge-triggered once, not re-armed for
        each request: a syscall less per request, which with many
        threads is a GIL hand-off less too.  Only when an edge came while
        its job was out (``edges``), or its last read filled its buffer
        (``filled``: the rest came with the edge already seen), is it
        armed again: epoll then looks at it afresh, and wakes the pool if
        bytes are still unread.  An edge can still come for bytes read
        already: a job served from epoll reads without waiting, and parks
        again if there is nothing.
        """
        fd = job.sock.fileno()
        if job.armed != event or fd in self.edges or job.filled:
            self.edges.discard(fd)
            try:
                self._arm(fd, event, job.armed is None)
            except OSError as err:      # out of epoll watches, or memory
                self.logger.error('cannot keep the connection from %s '
                                  'open: %s', job.client, _one_line(err))
                job.close()
                self.closed()
                return
            job.armed = event
        self.parked[fd] = (job, time.monotonic())

    def _arm(self, fd, event, new):
        mask = event | select.EPOLLET
        if new:
            try:
                return self.epoll.register(fd, mask)
            except FileExistsError:     # left by a closed one's dup
                pass
        self.epoll.modify(fd, mask)

    def unpark(self, fd):
        """The job parked on ``fd``, now readable (or writable); None if
        it is out (served, or its answer being sent): noted for its next
        park."""
        parked = self.parked.pop(fd, None)
        if parked is None:
            self.edges.add(fd)
            return None
        return parked[0]

    def due(self, now):
        """Close connections parked for ``idle_timeout`` by ``now``, end a
        pause that is over; the seconds until the next of those is due, or
        None."""
        timeout = None
        while self.parked:
            fd, (job, since) = next(iter(self.parked.items()))
            if since + self.idle_timeout > now:
                timeout = since + self.idle_timeout - now
                break
            self._close(fd, job)
        if self.paused_until:
            if now < self.paused_until:
                return min(timeout or 1.0, self.paused_until - now)
            self.paused_until = 0.0
            self._room_changed()
        return timeout

    def make_room(self):
        """Out of file descriptors.  Close the connections parked longest
        (idle keep-alive ones, and new ones yet to send a request; never
        one still sending an answer): any client may see an idle
        connection closed.  With none parked, stop accepting for a
        moment; the backlog holds the rest.  Logged once, until the
        shortage is over."""
        if self.fd_shortage is None:
            self.fd_shortage = [self.open, 0]   # open then, closed since
            self.logger.error(
                '%s is out of file descriptors with %d connections open; '
                'closing the longest idle ones to accept new ones (raise '
                'the limit: ulimit -n, or systemd LimitNOFILE=; or lower '
                'concurrent_per_worker)', self.label, self.open)
        closing = list(itertools.islice(
            ((fd, job) for fd, (job, _since) in self.parked.items()
             if job.unsent is None),    # not one whose answer is going out
            _ROOM_PER_SHORTAGE))
        for fd, job in closing:
            self._close(fd, job)
        self.fd_shortage[1] += len(closing)
        if not closing:
            self.pause(_ACCEPT_PAUSE)

    def pause(self, seconds):
        """Accept nothing for ``seconds``: the backlog holds new
        connections meanwhile, or a sibling takes them."""
        self.paused_until = time.monotonic() + seconds
        self._room_changed()

    def ahead(self):
        """True when this worker has clearly more connections open than
        one of its siblings."""
        return (self.open > _SPREAD_MARGIN and
                self.siblings.ahead(self.open))

    def _shortage_over(self):
        """The shortage is over once the connections open fell well below
        where it began."""
        began_at, closed = self.fd_shortage
        if self.open < began_at * 0.9:
            self.fd_shortage = None
            self.logger.warning('%s has file descriptors to spare again; '
                                'it closed %d idle connections for room',
                                self.label, closed)

    def stop_accepting(self):
        """For good: the listening socket is about to be closed."""
        self.stopped = True
        self.accepting = False
        self.epoll.unregister(self.listener_fd)
        self.siblings.tell(None)

    def close_idle(self):
        """Close the parked connections that are between requests."""
        for fd, (job, _since) in list(self.parked.items()):
            if job.idle:
                self._close(fd, job)

    def _close(self, fd, job):
        del self.parked[fd]
        self.edges.discard(fd)
        self.epoll.unregister(fd)
        job.close()
        self.closed()

    def _room_changed(self):
        """Accept only while fewer than ``limit`` are open (and not
        paused); tell the siblings."""
        if not self.stopped:
            # Stopped, it told them once: its bucket may be its
            # replacement's already.
            self.siblings.tell(self.open)
        accepting = (self.open < self.limit and not self.stopped and
                     not self.paused_until)
        if accepting != self.accepting:
            self.accepting = accepting
            self.epoll.modify(self.listener_fd,
                              select.EPOLLIN if accepting else 0)


class _Siblings(object):
    """How many connections a worker and the other workers of its
    subserver have open, told through their stats buckets, so that new
    connections are spread over them.

    The workers accept from one listening socket, and the first to look
    takes what waits.  A worker that is running looks first, while a
    sibling asleep in epoll waits for a CPU: on a busy machine one worker
    took every connection of a burst, and with few long-lived ones (a
    proxy's keep-alive pool, a load test's 50) it served them all while
    its sibling idled, at half the rate.  So a worker with more than
    twice as many open as a sibling still accepting (and _SPREAD_MARGIN
    more) takes one new connection and pauses (_SPREAD_PAUSE), leaving
    the rest to it; if the sibling does not take them (short of a CPU,
    or hung), it still takes one per pause.

    Each worker writes only its own bucket, and reads the others'
    without a lock: the counts are whole words, at worst a moment old.
    """

    def __init__(self, bucket, others):
        self.bucket = bucket        # this worker's
        self.others = others        # the other workers' buckets

    def tell(self, count):
        """This worker has ``count`` connections open; None: it accepts
        no more."""
        self.bucket.set('_open', 0 if count is None else count + 1)

    def ahead(self, count):
        """True when ``count`` is clearly more than a sibling's that is
        up, not stopped accepting (draining), and beating."""
        now = time.time()
        least = None
        for bucket in self.others:
            told = bucket.get('_open')
            if (told and bucket.get('_pid') and
                    now - bucket.heartbeat() < _SIBLING_SILENT and
                    (least is None or told - 1 < least)):
                least = told - 1
        return least is not None and count > 2 * least + _SPREAD_MARGIN


class _Turn(object):
    """A job's hold on the turn: ``pass_on()`` before it waits on its
    client; ``before_app()`` before it runs an app, which passes the turn
    on when the worker's apps wait."""

    __slots__ = ('pool', 'number', 'for_app')

    def __init__(self, pool, number):
        self.pool = pool
        self.number = number
        self.for_app = False    # it passed on before an app

    def pass_on(self):
        self.pool.pass_turn(self.number)

    def before_app(self):
        """True when the turn passed on."""
        if self.pool.apps_wait():
            self.pool.pass_turn(self.number)
            self.for_app = True
            return True
        return False


class _PoolThread(object):
    """A pool thread: the lock that wakes it for the turn, and its times,
    to tell an app that waits from one that computes: how long the thread
    ran (its CPU clock, exact even for another thread to read), how long
    it waited for a CPU (the kernel's schedstat: exact for the thread
    itself, up to a scheduler tick late for another) and how long the
    process's other threads ran meanwhile.  Where there is no /proc, the
    clocks alone."""

    def __init__(self):
        self.clock = time.pthread_getcpuclockid(threading.get_ident())
        # Held but while the thread may take the turn: released, it wakes.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.stat = self._open('stat')
        self.schedstat = self._open('schedstat')

    @staticmethod
    def _open(name):
        try:
            return os.open('/proc/thread-self/' + name,
                           os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def times(self):
        """(now, ran, waited for a CPU, the process ran), in seconds, of
        this thread, read by itself."""
        return (time.monotonic(), self.cpu(), self.delayed(),
                time.process_time())

    def cpu(self):
        """Seconds this thread has run."""
        return time.clock_gettime(self.clock)

    def delayed(self):
        """Seconds this thread has waited for a CPU, as of its last turn
        on one (0 where unknown)."""
        if self.schedstat is None:
            return 0.0
        return int(os.pread(self.schedstat, 128, 0).split()[1]) / 1e9

    def blocked(self, span, ran):
        """True for a thread, ``span`` seconds into a job in which it ran
        ``ran``, that has mostly been blocked and is still: it sleeps now
        (a thread short of a CPU is ready to run, not blocked)."""
        if span < 2 * _WAITED or ran > span / 4:
            return False
        if self.stat is None:
            return True
        state = os.pread(self.stat, 512, 0).rpartition(b')')[2].split()[:1]
        return state != [b'R']

    def close(self):
        for fd in (self.stat, self.schedstat):
            if fd is not None:
                os.close(fd)


def _waited(before, after):
    """True when a thread mostly waited between two times() readings: it
    spent more than half the time neither running nor waiting for a CPU
    (_WAITED), and the process's other threads did not run through most
    of that time, as they would if it had waited for the GIL: that is an
    app computing, not one that waits."""
    span = after[0] - before[0]
    ran = after[1] - before[1]
    blocked = span - ran - (after[2] - before[2])
    others_ran = after[3] - before[3] - ran
    return blocked >= max(_WAITED, span / 2) and others_ran < blocked / 2


class _Call(object):
    """The job of a connection served by one call of ``serve(sock,
    address, turn)``: a TCP handler, or a TLS handshake and then the
    connection's own job."""

    idle = False
    unsent = None
    filled = False
    armed = None

    def __init__(self, serve, sock, address):
        self.call = serve
        self.sock = sock
        self.address = address
        self.client = address[0]

    def serve(self, turn):
        return self.call(self.sock, self.address, turn)

    def close(self):
        self.sock.close()


#: The job of accepting a connection, beside parked ones with a request.
_ACCEPT = 'accept'
#: What accept() returns when the process is out of file descriptors.
_NO_DESCRIPTORS = 'no descriptors'
_OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                 errno.ENOMEM))


# ---------------------------------------------------------------------------
# Subservers: WSGI, TCP, UDP and daemons
# ---------------------------------------------------------------------------

class Subserver(object):
    """A configuration section that brimd serves with worker processes.

    In the main process it reads its section (``configure``); in each
    worker process it runs the serving loop (``serve_forever``) for one
    worker ``index``.  Apps and
    handlers reach it as ``env['brim']`` or their ``subserver`` argument,
    and most use its ``logger``; ``settings`` are its section's, as
    ``check`` shows them.
    """

    kind = None

    def __init__(self, server, name):
        self.server = server
        self.name = name
        self.stats_conf = {}
        self.worker_index = None
        self.stats = None
        self.draining = False
        self.retiring = False       # a replacement was asked for
        self.reopen_pending = False
        self.logger = None

    def configure(self, conf):
        """Read this section's settings (main process, before forking)."""
        self.settings = _read_settings(conf, self.name, self.kind)
        self.stats_conf['log_lines_dropped'] = 'sum'

    # Read by apps: the original brimd's subserver had them.
    json_dumps = property(lambda self: self.settings.dumps)
    json_loads = property(lambda self: self.settings.loads)

    def _add_stats(self, call_name, cls, conf):
        """Add what ``cls.stats_conf(call_name, conf)`` declares."""
        stats_conf = getattr(cls, 'stats_conf', None)
        if stats_conf is None:
            return
        try:
            declared = list(stats_conf(call_name, conf))
        except Exception as err:
            raise ConfError('[%s] stats_conf failed: %s'
                            % (call_name, _one_line(err)))
        for stat_name, stat_type in declared:
            if stat_type not in STAT_TYPES:
                raise ConfError('[%s] stat %s has type %r; use one of %s.'
                                % (call_name, stat_name, stat_type,
                                   ', '.join(STAT_TYPES)))
            self.stats_conf[stat_name] = stat_type

    def _load_call(self, conf, section, dotted, also_known=()):
        """(class, parsed conf) for ``[section] call = dotted``; a class
        that declares its ``options`` gets the others refused."""
        if not dotted:
            raise ConfError('[%s] needs call = package.module.Class.'
                            % section)
        cls = import_call(section, dotted)
        _check_app_options(section, cls, conf, also_known)
        parsed = conf
        parse = getattr(cls, 'parse_conf', None)
        if parse is not None:
            try:
                parsed = parse(section, conf)
            except Exception as err:
                raise ConfError(_one_line(err))
        self._add_stats(section, cls, conf)
        return cls, parsed

    @property
    def bucket_count(self):
        """Stats buckets (and worker slots) laid out: room for every
        worker the subserver may come to run."""
        return self.settings.max_workers

    @property
    def starting_workers(self):
        """How many workers run when brimd starts."""
        return self.settings.workers.least

    def bucket_labels(self):
        return [str(i) for i in range(self.bucket_count)]

    def worker_label(self, index):
        """'[wsgi] worker 0' or '[daemons] daemon name', for log lines."""
        return '[%s] %s %s' % (self.name, 'daemon' if self.kind == 'daemons'
                               else 'worker', self.bucket_labels()[index])

    def addresses(self):
        return []

    def check(self, held):
        """``check``'s line for this subserver; raises ConfError."""
        return '[%s] %s: %s' % (self.name, self.kind, ', '.join(
            self.bucket_labels()))

    def open_log(self, to_stderr):
        """The worker's logger; opened before privileges are dropped, so a
        log file only root may write still gets the worker's lines.

        A fatal signal (SIGABRT from the main process when the worker hangs,
        or a crash in C code) dumps every thread's stack into that log.
        """
        # Lines dropped before this process became the worker (by the main
        # process, the count copied by fork) are not the worker's.
        self.dropped_before = _log_lines.dropped
        # Without a log_file of its own or [brim]'s, a daemon logs where
        # the main process does (see _load_server).
        settings = self.settings
        self.logger = get_logger(
            settings.log_name, settings.log_level, settings.log_facility,
            settings.log_file or self.server.fallback_log_file, to_stderr,
            settings.log_format)
        for handler in self.logger.handlers:
            if isinstance(handler, _AppendHandler):
                faulthandler.enable(handler.fd, all_threads=True)
            elif to_stderr:
                faulthandler.enable(sys.stderr, all_threads=True)

    def note_reopen(self):
        """SIGUSR1 handler: the serving loop reopens the log soon."""
        self.reopen_pending = True

    def _tick(self):
        """Housekeeping the serving loop does at least once a second."""
        _flush_logs()
        self.stats.beat()
        self.stats.set('log_lines_dropped',
                       _log_lines.dropped - self.dropped_before)
        if self.reopen_pending:
            self.reopen_pending = False
            _reopen_logs()

    def start_worker(self, index, bucket):
        """Set up worker ``index`` in its own process (or thread)."""
        self.worker_index = index
        self.stats = bucket
        bucket.logger = self.logger     # the bucket was made before forking
        bucket.set('_pid', os.getpid())
        if 'start_time' in self.stats_conf:
            bucket.set('start_time', time.time())
        self.parent_pid = os.getppid()

    def _read_stats(self):
        """Every subserver's stats, read now (a _StatsReading), for
        WSGIStats: from the memory the main process laid out before
        forking, with brimd's start time (kept by restarts in place)."""
        return self.server.stats_layout.read(self.server.start_time)

    def orphaned(self):
        """True when the main process is gone: the worker should exit."""
        return self.server.forked and os.getppid() != self.parent_pid

    def open_wakeups(self):
        """Make, in the worker process, what drain() writes to, before
        any signal can ask for a drain."""

    def drain(self):
        """Stop taking new work; finish what is in hand.  Signal-safe."""
        self.draining = True


class _IPSubserver(Subserver):
    """A subserver with a listening socket: WSGI, TCP and UDP."""

    def __init__(self, server, name):
        Subserver.__init__(self, server, name)
        self.sock = None
        self.bound_port = None
        self.stats_conf['start_time'] = 'worker'

    def configure(self, conf):
        Subserver.configure(self, conf)
        family, path = _address_family(self.settings.ip)
        self.unix_path = None
        if family != socket.AF_UNIX:
            return
        if self.kind == 'udp':
            raise ConfError('[%s] ip = %s: a [udp] subserver cannot listen '
                            'on a Unix socket; use an IP address.'
                            % (self.name, self.settings.ip))
        if not path:
            raise ConfError('[%s] ip = unix: names no socket file; give its '
                            'path (unix:/run/brim/app.sock).' % self.name)
        # Absolute: stop removes it from wherever brimd's directory is.
        self.unix_path = os.path.abspath(path)

    @property
    def port(self):
        """The port bound (the one the system chose, for port 0), else the
        one configured; None on a Unix socket."""
        if self.unix_path is not None:
            return None
        if self.bound_port is None:
            return self.settings.port
        return self.bound_port

    @property
    def address(self):
        """``ip:port``, or ``unix:PATH``."""
        if self.unix_path is not None:
            return 'unix:%s' % self.unix_path
        return '%s:%s' % (self.settings.ip, self.port)

    def addresses(self):
        return [self.address]

    def start_worker(self, index, bucket):
        Subserver.start_worker(self, index, bucket)
        # Workers wait for the socket (select, epoll), then take what is
        # there: another worker may have been quicker.
        self.sock.setblocking(False)
        self.served = itertools.count(1)
        self.request_limit = 0
        if self.settings.max_requests:
            self.request_limit = self.settings.max_requests + random.randint(
                0, self.settings.max_requests_jitter)

    def count_served(self, toward_limit=True):
        """Count a request, connection or datagram as it starts, and
        (unless the accept loop counted it already) toward max_requests."""
        self.stats.begin()
        if toward_limit:
            self.count_toward_limit()

    def count_toward_limit(self):
        """The one that reaches max_requests recycles the worker.  New
        connections are counted by the accept loop itself, as it accepts
        them: counted on the serving thread, the next connection could be
        accepted before the limit was seen."""
        if next(self.served) == self.request_limit:
            self.retire('served max_requests (%d)' % self.request_limit)

    def retire(self, reason):
        """Have the main process start a replacement, then drain this one.

        The main process answers with SIGHUP once the replacement serves,
        so the port never goes without a worker accepting.
        """
        if self.retiring or not self.server.forked:
            return
        self.retiring = True
        self.logger.info('[%s] worker %d %s; recycling it: asking for a '
                         'replacement', self.name, self.worker_index, reason)
        # Stop accepting now: the backlog holds new connections for the
        # few milliseconds the replacement needs to fork.
        self.drain()
        try:
            with _ask(self.parent_pid, b'retire'):
                pass
        except OSError:
            pass            # no main process: this worker just ends

    def open_wakeups(self):
        # A drain writes to both: the serving loop's wake-up pipe, which it
        # reads, and one that is readable from the drain on, never read,
        # which wakes the connection pool whenever it looks.
        self.wake_r, self.wake_w = os.pipe()
        self.drained_r, self.drained_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.drained_w, False)

    def drain(self):
        Subserver.drain(self)
        for fd in (self.wake_w, self.drained_w):    # wake both loops now
            try:
                os.write(fd, b'\0')
            except OSError:     # full (a wake-up is pending), or closed
                pass

    def _keys(self):
        """The keys an inherited socket for this address may have."""
        kind = 'udp' if self.kind == 'udp' else 'tcp'
        ip = self.settings.ip
        if self.unix_path is not None:
            return [_socket_key(kind, self.unix_path, None)]
        keys = [_socket_key(kind, _address_family(ip)[1], self.port)]
        if ip.strip() in ('', '*'):
            # systemd's ListenStream=PORT binds [::] (dual stack).
            keys.append(_socket_key(kind, '::', self.port))
        return keys

    def bind(self, inherited):
        """Take the socket a previous brimd handed over, else bind one."""
        for key in self._keys():
            self.sock = inherited.pop(key, None)
            if self.sock is not None:
                break
        else:
            self.sock = self._bind()
        if self.unix_path is None:
            self.bound_port = self.sock.getsockname()[1]

    def _bind(self):
        if self.unix_path is not None:
            owner = None
            if self.server.uid is not None and os.geteuid() == 0:
                owner = (self.server.uid, self.server.gid)
            return _bind_unix(self.name, self.unix_path,
                              self.settings.backlog,
                              self.settings.socket_mode, owner)
        return _bind(self.name, self.settings.ip, self.port,
                     'udp' if self.kind == 'udp' else 'tcp',
                     self.settings.backlog, self.settings.listen_retry,
                     self._reuse_port())

    def check(self, held):
        if any(key in held for key in self._keys()):
            where = 'held by the running brimd'
        elif self.unix_path is not None:
            _check_unix_path(self.name, self.unix_path, False)
            where = 'free to bind'
        else:
            where = self._check_bind()
        return '[%s] %s on %s (%s), %s workers (at most %d)%s' % (
            self.name, self.kind, self.address, where, self.settings.workers,
            self.settings.max_workers, ', TLS' if self.settings.tls else '')

    def _reuse_port(self):
        return getattr(self.settings, 'reuse_port', False)    # not [udp]

    def _check_bind(self):
        """Whether ``check`` could bind the port: free, or (reuse_port)
        shared with another listener that sets SO_REUSEPORT too."""
        kind = 'udp' if self.kind == 'udp' else 'tcp'
        try:
            _bind(self.name, self.settings.ip, self.port, kind, 1, 0).close()
            return 'free to bind'
        except ConfError:
            if not self._reuse_port():
                raise
        _bind(self.name, self.settings.ip, self.port, kind, 1, 0,
              True).close()
        return 'in use, shared by reuse_port'

    def remove_socket_file(self):
        """Remove the Unix socket's file: brimd ends, handing its socket
        over to no one."""
        if self.unix_path is None or self.sock is None:
            return
        try:
            os.unlink(self.unix_path)
        except OSError:
            pass

    def _serve_loop(self, on_ready=None):
        """Beat the heartbeat (at least once a second) until a drain or the
        main process is gone; meanwhile wait for ``self.sock`` readable and
        call ``on_ready``, or (None) just wait: pooled threads accept."""
        wake_r = self.wake_r
        # A signal only needs to wake the select: with the pipe full, one
        # already will, so that is no reason to complain.
        wakes_on_signals = (threading.current_thread() is
                            threading.main_thread())
        if wakes_on_signals:
            signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        sock = self.sock
        waits = [wake_r] if on_ready is None else [sock, wake_r]
        while not self.draining and not self.orphaned():
            self._tick()
            readable = select.select(waits, [], [], 1.0)[0]
            if wake_r in readable:
                os.read(wake_r, 512)
            if sock in readable and not self.draining:
                on_ready(sock)
        self.drain()
        # Signals still come while the worker drains (SIGHUP, SIGUSR1):
        # the wakeup fd goes before the pipe's read end, or each one logs
        # "Exception ignored when trying to write to the signal wakeup
        # fd: BrokenPipeError".  drain() ignores its own write failing.
        if wakes_on_signals:
            signal.set_wakeup_fd(-1)
        os.close(wake_r)

    def _accept_connections(self, handle):
        """The serving loop of WSGI and TCP workers: pooled threads accept
        and serve; this thread beats the heartbeat, then waits for the
        connections in hand when draining."""
        if self.settings.tls is not None:
            handle = _after_handshake(handle, self.name, self.settings,
                                      self.logger)
        if self.settings.proxy_protocol:
            handle = _after_proxy_header(handle, self.name, self.settings,
                                         self.logger)
        _batch_logs(self.logger)
        layout = self.server.stats_layout
        siblings = _Siblings(self.stats, [
            layout.bucket(self, index) for index in range(self.bucket_count)
            if index != self.worker_index])
        pool = _ConnectionPool(
            self.sock, self.drained_r, self._accept, handle,
            self.settings.concurrent_per_worker,
            self.settings.client_timeout, self.logger,
            '[%s] worker %d' % (self.name, self.worker_index), siblings)
        self._serve_loop()
        # The thread with the turn closes the listening socket; an orphaned
        # worker ends at once, and must not hold the port while it does.
        pool.stopped.wait(1.0)
        deadline = time.monotonic() + self.server.settings.graceful_timeout
        while (pool.conns.open and time.monotonic() < deadline and
                not self.orphaned()):
            self._tick()
            self._close_idle()
            time.sleep(0.05)
        if pool.conns.open:
            self.logger.warning(
                '[%s] worker %d: graceful_timeout (%gs) is over; exiting, '
                'killing %d connections in flight%s', self.name,
                self.worker_index, self.server.settings.graceful_timeout,
                pool.conns.open,
                ''.join(
                    '; %s %s %s' % current[1:] for current in
                    self._requests_in_flight()))

    def _accept(self):
        """A new connection; None: another worker was quicker, or this one
        cannot accept (then it retires); _NO_DESCRIPTORS: the pool is to
        make room.  A replacement would inherit the same limit and the same
        clients, so running out of descriptors is no reason to retire."""
        if self.draining:
            return None
        try:
            client, address = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as err:
            if err.errno in _OUT_OF_DESCRIPTORS:
                return _NO_DESCRIPTORS
            self.logger.error('[%s] worker %d cannot accept: %s', self.name,
                              self.worker_index, _one_line(err))
            self.retire('cannot accept (%s)' % (err.strerror or err))
            self.drain()        # without a main process, retire does not
            return None
        self.count_toward_limit()   # may start draining
        if self.unix_path is not None:
            # A Unix socket's peer has no address: REMOTE_ADDR and the
            # handler's ip and port are ''.
            address = ('', '')
        try:
            if self.unix_path is None:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.tls is not None:
                client = self.settings.tls.wrap_socket(
                    client, server_side=True, do_handshake_on_connect=False)
        except OSError:     # reset already (wrap_socket reads to see)
            client.close()
            return None
        return client, address

    def _requests_in_flight(self):
        """(start, txn, method, path) of each request being served."""
        return []

    def _close_idle(self):
        pass


def _after_handshake(handle, name, settings, logger):
    """Jobs that do the TLS handshake, then ``handle``'s job; the
    handshake waits on the client, so the turn passes on first."""
    def handshake_and_serve(sock, address, turn, peer=None):
        turn.pass_on()
        sock.settimeout(settings.client_timeout)
        try:
            sock.do_handshake()
        except OSError as err:
            logger.info('[%s] TLS handshake with %s failed: %s',
                        name, address[0], _one_line(err))
            sock.close()
            return None
        return handle(sock, address, peer).serve(None)

    def job(sock, address, peer=None):
        return _Call(lambda sock, address, turn: handshake_and_serve(
            sock, address, turn, peer), sock, address)
    return job


def _after_proxy_header(handle, name, settings, logger):
    """Jobs that read the PROXY header of a connection from a peer in
    proxy_allow_ips, then do ``handle``'s job as the client's (its
    peer, the proxy, still decides whose forwarded headers count).
    Anyone else's connection is ``handle``'s at once: a PROXY header
    from them is just their bytes."""
    allowed = settings.proxy_allow_ips

    def read_header_and_serve(sock, peer, turn):
        turn.pass_on()  # the header waits on the client
        try:
            address = _read_proxy_header(sock, settings.client_timeout)
        except (_ProxyError, OSError) as err:
            logger.warning(
                '[%s] closed the connection from %s: PROXY header: %s',
                name, _peer_name(peer), _one_line(err))
            sock.close()
            return None
        return handle(sock, address or peer, peer).serve(turn)

    def job(sock, peer):
        if not _trusted_peer(allowed, peer):
            return handle(sock, peer)
        return _Call(read_header_and_serve, sock, peer)
    return job


def _peer_name(address):
    """A peer's address as a log line names it."""
    if isinstance(address, tuple) and len(address) >= 2:
        return '%s:%s' % address[:2]
    return str(address or 'a local peer')


def _as_it_is(app):
    """A plain WSGI app as a link of an app chain: it takes no next app."""
    return lambda name, parsed, next_app: app


class _ServerFromHost(object):
    """On a Unix socket the socket says nothing of the server's name and
    port: SERVER_NAME and SERVER_PORT come from the Host header (a proxy
    in front sends the one the client asked for)."""

    def __init__(self, app):
        self.app = app

    def __call__(self, env, start_response):
        host = env.get('HTTP_HOST')
        if host:
            name, colon, port = host.rpartition(':')
            if not colon or name.endswith(':') or port.endswith(']'):
                name, port = host, ''    # no port, or a bare IPv6 address
            env['SERVER_NAME'] = name
            env['SERVER_PORT'] = port
        return self.app(env, start_response)


class WSGISubserver(_IPSubserver):
    """``[wsgi]`` / ``[wsgi#name]``: serves a chain of WSGI apps."""

    kind = 'wsgi'
    statsd = None   # a worker's _Statsd, with [brim] statsd_host

    def configure(self, conf):
        _IPSubserver.configure(self, conf)
        if self.server.settings.statsd_host:
            self.stats_conf['statsd_dropped'] = 'sum'
        for stat in ['request_count', 'status_2xx_count', 'status_3xx_count',
                     'status_4xx_count', 'status_5xx_count'] + [
                'status_%d_count' % c
                for c in self.settings.count_status_codes]:
            self.stats_conf[stat] = 'sum'
        # (name, make, parsed): make(name, parsed, next_app) is the app; for
        # brim's apps, their class.
        self.apps = []
        names = list(self.settings.apps)
        for app_name, after in zip(names, names[1:] + [None]):
            spec = _app_call(conf, app_name)
            if ':' in spec:
                self.apps.append((app_name, self._load_plain_app(
                    app_name, spec, after), None))
            else:
                cls, parsed = self._load_call(conf, app_name, spec)
                self.apps.append((app_name, cls, parsed))

    def _load_plain_app(self, section, spec, after):
        """What makes ``call = package.module:app`` (or ``:factory()``)
        in each worker; it ends the chain, as it takes no next app."""
        if after is not None:
            raise ConfError('[%s] apps: [%s] call = %s is a plain WSGI app, '
                            'which ends the chain, so [%s] after it would '
                            'never be reached; list %s last.' % (
                                self.name, section, spec, after, section))
        app, is_factory = import_app(section, spec)
        if not is_factory:
            return _as_it_is(app)

        def make(name, parsed, next_app):
            try:
                made = app()
            except Exception as err:
                raise ConfError('[%s] call = %s raised %s: %s' % (
                    section, spec, type(err).__name__,
                    _one_line(err))) from err
            if not callable(made):
                raise ConfError('[%s] call = %s returned a %s, not a WSGI '
                                'app.' % (section, spec,
                                          type(made).__name__))
            return made
        return make

    def start_worker(self, index, bucket):
        _IPSubserver.start_worker(self, index, bucket)
        # A txn is 32 lowercase hex digits, the shape of the original
        # brimd's uuid4().hex, made cheaply: 64 random bits per worker
        # (workers and restarts never share them in practice), then a
        # 64-bit count that no worker lives long enough to wrap.
        self.txn_prefix = os.urandom(8).hex()
        self.txn_counter = itertools.count(1)
        self.connections = set()
        self.next_request_check = 0.0
        self.status_slots = self._status_slots()
        self.statsd = _open_statsd(self.server)
        base_env = self._base_env(bucket)
        app = self._not_found
        for app_name, make, parsed in reversed(self.apps):
            app = make(app_name, parsed, app)
        if self.unix_path is not None:
            app = _ServerFromHost(app)
        self.site = _HTTPSite(
            app=app, base_env=base_env,
            parser=_RequestParser(_HTTPLimits.of(self.settings)),
            logger=self.logger, tls=self.settings.tls is not None,
            connections=self.connections, next_txn=self.next_txn,
            began=self._request_began, ended=self._request_ended,
            refused=self.count_request, draining=lambda: self.draining,
            forwarded_allow=self.settings.forwarded_allow_ips)

    def _base_env(self, bucket):
        """What every request's environ starts from in this worker."""
        if self.unix_path is None:
            host, port = self.sock.getsockname()[:2]
        else:
            host, port = self.unix_path, ''
        base_env = {
            'SCRIPT_NAME': '', 'SERVER_NAME': host, 'SERVER_PORT': str(port),
            'wsgi.version': (1, 0),
            'wsgi.url_scheme': ('http' if self.settings.tls is None
                                else 'https'),
            'wsgi.errors': _ErrorStream(self.logger),
            'wsgi.multithread': True, 'wsgi.multiprocess': True,
            'wsgi.run_once': False, 'wsgi.input_terminated': True,
            'wsgi.file_wrapper': _FileWrapper,
            'brim': self, 'brim.logger': self.logger, 'brim.stats': bucket,
            'brim.json_dumps': self.settings.dumps,
            'brim.json_loads': self.settings.loads,
        }
        if self.settings.tls is not None:
            base_env['HTTPS'] = 'on'
        return base_env

    def _status_slots(self):
        """{status code: the bucket's slots that count it}, for every code:
        looked up once, so counting a request is one or two stores."""
        slots = {}
        for code in range(100, 600):
            names = ['request_count']
            if 200 <= code < 600 and code // 100 > 1:
                names.append('status_%dxx_count' % (code // 100))
            if code in self.settings.count_status_codes:
                names.append('status_%d_count' % code)
            slots[code] = self.stats.slots(names)
        return slots

    def count_request(self, code):
        """Count a request refused before it began."""
        self.stats.incr_slots(self._code_slots(code))

    def _code_slots(self, code):
        return self.status_slots.get(code) or self.status_slots[500]

    def next_txn(self):
        return '%s%016x' % (self.txn_prefix, next(self.txn_counter))

    def _request_began(self, start, txn, method, path, first):
        self.stats.note_request(start, txn, method, path)
        # A connection's first request was counted when it was accepted.
        self.count_served(toward_limit=not first)

    def _request_ended(self, env, response, duration, txn):
        self.stats.end(duration, self._code_slots(response.code))
        if self.statsd:
            self.statsd.request(response.code, duration)
        # An app may spare the log a line (WSGIHealth's frequent probes).
        if env.get('brim.log_request', True):
            self.log_request(env, response, duration, txn)

    def log_request(self, env, response, duration, txn):
        """The one NOTICE line per request.  It never raises: a line that
        cannot be made (a ``brim.log_info`` word whose str() fails) is
        counted as dropped, and the connection goes on."""
        try:
            if not self.logger.isEnabledFor(NOTICE):
                return
            if self.settings.log_format == 'json':
                self._log_request_json(env, response, duration, txn)
            else:
                self._log_request_text(env, response, duration, txn)
        except Exception:
            _count_dropped()

    def _log_request_text(self, env, response, duration, txn):
        """The line in the original brimd's order.

        client, remote address, -, user, time, method, path?query,
        protocol, status, bytes out, bytes in, referer, user agent, txn,
        seconds, then ``brim.log_info`` words.  Each field is one word:
        spaces, controls and ``%`` are percent-quoted, so a line never breaks.
        """
        path = env.get('PATH_INFO', '')
        if env.get('QUERY_STRING'):
            path += '?' + env['QUERY_STRING']
        words = [env.get('brim.client_addr', env.get('REMOTE_ADDR')),
                 env.get('REMOTE_ADDR'), None,
                 env.get('REMOTE_USER'), _log_lines.time(),
                 env.get('REQUEST_METHOD'), path, env.get('SERVER_PROTOCOL'),
                 response.code, response.sent,
                 response.bytes_in(), env.get('HTTP_REFERER'),
                 env.get('HTTP_USER_AGENT'), txn, '%.5f' % duration]
        words.extend(env.get('brim.log_info') or ())
        if self.settings.log_headers:
            words.append('headers:')
            words.extend('%s:%s' % (k[5:].replace('_', '-').title(), v)
                         for k, v in sorted(env.items())
                         if k.startswith('HTTP_'))
        self.logger.handle(_RequestRecord(self.logger.name,
                                          _log_words(words)))

    def _log_request_json(self, env, response, duration, txn):
        record = _RequestRecord(self.logger.name, '')
        record.fields = {
            'client': env.get('brim.client_addr', env.get('REMOTE_ADDR')),
            'user': env.get('REMOTE_USER'),
            'method': env.get('REQUEST_METHOD'),
            'path': env.get('PATH_INFO', ''),
            'query': env.get('QUERY_STRING', ''),
            'protocol': env.get('SERVER_PROTOCOL'), 'status': response.code,
            'bytes': response.sent,
            'bytes_in': response.bytes_in(),
            'duration_ms': round(duration * 1000, 3), 'txn': txn,
            'user_agent': env.get('HTTP_USER_AGENT'),
            'referer': env.get('HTTP_REFERER'),
            'log_info': [str(w) for w in env.get('brim.log_info') or ()]}
        if self.settings.log_headers:
            record.fields['headers'] = {
                k[5:].replace('_', '-').title(): v
                for k, v in env.items() if k.startswith('HTTP_')}
        self.logger.handle(record)

    @staticmethod
    def _not_found(env, start_response):
        """brimd itself, the last app of every chain: 404."""
        status, headers, body = _plain_answer(404)
        start_response(status, headers)
        return [body]

    def serve_forever(self):
        self._accept_connections(self._handle)
        if self.statsd is not None:
            self.statsd.flush()     # the last lines: the worker exits

    def _handle(self, sock, address, peer=None):
        """A new connection's job, for the pool; ``peer``: the proxy that
        sent a PROXY header with ``address``."""
        conn = _HTTPConnection(self.site, sock, address, peer)
        self.connections.add(conn)
        return conn

    def _tick(self):
        _IPSubserver._tick(self)
        if self.statsd is not None:
            self.statsd.flush()
            self.stats.set('statsd_dropped', self.statsd.dropped)
        now = time.time()
        if self.settings.request_timeout and now >= self.next_request_check:
            self.next_request_check = now + 1.0
            self._check_request_times(now)

    def _requests_in_flight(self):
        return [conn.current for conn in list(self.connections)
                if conn.current]

    def _check_request_times(self, now):
        """A request over request_timeout: log it, recycle this worker."""
        timeout = self.settings.request_timeout
        for conn in list(self.connections):
            current = conn.current
            if (current and now - current[0] > timeout and
                    not self.retiring):
                conn.current = None     # report each request once
                started, txn, method, path = current
                self.logger.error('request %s %s %s has run for %.0fs, over '
                                  'request_timeout (%gs)', txn, method, path,
                                  now - started, timeout)
                self.retire('has a request over request_timeout')

    def _close_idle(self):
        """While draining, end keep-alive connections between requests."""
        for conn in list(self.connections):
            if conn.idle:
                conn.closing = True
            # Read again after closing is set (see _serve_requests): a
            # request that came meanwhile is served, or refused unserved.
            if not (conn.closing and conn.idle):
                continue
            try:
                # The plain socket's shutdown, also under TLS: the
                # SSLSocket's would drop its state under the thread
                # reading it.  The reader sees the end of the stream.
                socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _HandlerSubserver(_IPSubserver):
    """What [tcp] and [udp] share: a handler class (``call``), made once
    per worker."""

    def configure(self, conf):
        _IPSubserver.configure(self, conf)
        self.handler_class, self.handler_conf = self._load_handler(conf)

    def _load_handler(self, conf):
        """(class, parsed conf) of a [tcp] or [udp] section's handler; one
        that declares its options shares the section with brim's."""
        return self._load_call(
            conf, self.name, self.settings.call,
            [option.name for option in _options_of(self.kind)])

    def start_worker(self, index, bucket):
        _IPSubserver.start_worker(self, index, bucket)
        self.handler = self.handler_class(self.name, self.handler_conf)


class TCPSubserver(_HandlerSubserver):
    """``[tcp]`` / ``[tcp#name]``: a handler called per connection."""

    kind = 'tcp'

    def serve_forever(self):
        self._accept_connections(self._job)

    def _job(self, sock, address, peer=None):
        return _Call(self._handle, sock, address)

    def _handle(self, sock, address, turn):
        if turn is not None:        # None: after a TLS handshake
            turn.pass_on()  # a handler may wait on its client at once
            sock.settimeout(self.settings.client_timeout)
        self.count_served(toward_limit=False)
        start = time.monotonic()
        try:
            self.handler(self, self.stats, sock, address[0], address[1])
        except Exception:
            self.logger.exception('[%s] handler raised serving %s:%s',
                                  self.name, address[0], address[1])
        finally:
            sock.close()
            self.stats.end(time.monotonic() - start)


class UDPSubserver(_HandlerSubserver):
    """``[udp]`` / ``[udp#name]``: a handler called per datagram."""

    kind = 'udp'

    def serve_forever(self):
        self._serve_loop(self._receive)
        self.sock.close()   # the port is free when every process has

    def _receive(self, sock):
        """Serve the datagrams waiting; another worker may win the race."""
        for _ in range(64):
            if self.draining:
                return
            try:
                datagram, address = sock.recvfrom(
                    self.settings.max_datagram_size)
            except (BlockingIOError, InterruptedError):
                return
            self.count_served()
            start = time.monotonic()
            try:
                self.handler(self, self.stats, sock, datagram, address[0],
                             address[1])
            except Exception:
                self.logger.exception('[%s] handler raised on a datagram '
                                      'from %s:%s', self.name, address[0],
                                      address[1])
            finally:
                self.stats.end(time.monotonic() - start)


class DaemonsSubserver(Subserver):
    """``[daemons] daemons = a b``: one supervised process per daemon."""

    kind = 'daemons'

    def __init__(self, server, name):
        Subserver.__init__(self, server, name)
        self.stats_conf['start_time'] = 'daemon'

    def configure(self, conf):
        Subserver.configure(self, conf)
        self.daemons = []
        for daemon_name in self.settings.daemons:
            cls, parsed = self._load_call(conf, daemon_name,
                                          _app_call(conf, daemon_name))
            self.daemons.append((daemon_name, cls, parsed))

    @property
    def bucket_count(self):
        return len(self.daemons)

    starting_workers = bucket_count

    def bucket_labels(self):
        return [name for name, _cls, _parsed in self.daemons]

    def start_worker(self, index, bucket):
        Subserver.start_worker(self, index, bucket)
        name, cls, parsed = self.daemons[index]
        self.daemon = cls(name, parsed)

    def serve_forever(self):
        """Run daemon ``worker_index`` until it returns (then it restarts).

        The daemon owns this process's main thread, so a helper thread
        beats the heartbeat and exits when the main process is gone.
        """
        threading.Thread(target=self._watch, daemon=True).start()
        self.daemon(self, self.stats)

    def _watch(self):
        while True:
            self._tick()
            if self.orphaned():
                os._exit(0)
            time.sleep(1.0)


# ---------------------------------------------------------------------------
# Apps that ship with brim
# ---------------------------------------------------------------------------

class WSGIEcho(object):
    """Echoes the request body at ``path`` (default /echo).

    Options: ``path``; ``max_echo`` (default 65536), the most bytes echoed.
    Counts ``<name>.requests``.
    """

    #: The options of its section, besides call; brim refuses others.
    options = ('path', 'max_echo')

    def __init__(self, name, parsed_conf, next_app):
        self.name = name
        self.next_app = next_app
        self.path, self.max_echo = parsed_conf
        self.stat = '%s.requests' % name

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != self.path:
            return self.next_app(env, start_response)
        env['brim.stats'].incr(self.stat)
        body = env['wsgi.input'].read(self.max_echo)
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]

    @classmethod
    def parse_conf(cls, name, conf):
        return (conf.get(name, 'path', '/echo'),
                conf.get_int(name, 'max_echo', 65536))

    @classmethod
    def stats_conf(cls, name, conf):
        return [('%s.requests' % name, 'sum')]


class WSGIStats(object):
    """Answers the server's stats at ``path`` (default /stats).

    JSON, unless a browser asks (Accept: text/html) or ``?format=html``
    does: then a live page that polls the JSON every ``refresh`` seconds
    (default 2).  ``?format=json`` is JSON whatever Accept says.  The
    Prometheus text format is at ``metrics_path`` (default /metrics) and
    at ``?format=prometheus``.
    """

    options = ('path', 'refresh', 'metrics_path')

    def __init__(self, name, parsed_conf, next_app):
        self.name = name
        self.next_app = next_app
        self.path, self.refresh, self.metrics_path = parsed_conf

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path != self.path and path != self.metrics_path:
            return self.next_app(env, start_response)
        if env['REQUEST_METHOD'] not in ('GET', 'HEAD'):
            return HTTPMethodNotAllowed(headers=[('Allow', 'GET, HEAD')])(
                env, start_response)
        answer = ('prometheus' if path == self.metrics_path else
                  self._format(env))
        if answer == 'json':
            return self._json(env, start_response)
        if answer == 'html':
            return self._page(env, start_response)
        if answer == 'prometheus':
            return self._prometheus(env, start_response)
        return HTTPBadRequest('format must be json, html or prometheus\n')(
            env, start_response)

    def _prometheus(self, env, start_response):
        body = _prometheus_text(env['brim']._read_stats()).encode('utf-8')
        start_response('200 OK', [
            ('Content-Type', 'text/plain; version=0.0.4; charset=utf-8'),
            ('Content-Length', str(len(body))), ('Cache-Control', 'no-store')])
        return [body]

    @staticmethod
    def _format(env):
        """The format asked for: ``?format=``, else html for a browser's
        Accept, else json."""
        asked = parse_qs(env.get('QUERY_STRING') or '').get('format')
        if asked:
            return asked[-1]
        return 'html' if 'text/html' in env.get('HTTP_ACCEPT', '') else 'json'

    def _json(self, env, start_response):
        snapshot = _stats_snapshot(env['brim']._read_stats())
        body = env['brim.json_dumps'](snapshot, sort_keys=True).encode()
        start_response('200 OK', [('Content-Type', 'application/json'),
                                  ('Content-Length', str(len(body))),
                                  ('Cache-Control', 'no-store'),
                                  ('Vary', 'Accept')])
        return [body]

    def _page(self, env, start_response):
        # _STATS_PAGE is at the end of this file, out of the code's way.
        nonce = base64.b64encode(os.urandom(16)).decode('ascii')
        body = _STATS_PAGE.substitute(
            nonce=nonce, refresh='%g' % self.refresh).encode('utf-8')
        start_response('200 OK', [
            ('Content-Type', 'text/html; charset=utf-8'),
            ('Content-Length', str(len(body))),
            ('Cache-Control', 'no-store'), ('Vary', 'Accept'),
            ('Content-Security-Policy',
             "default-src 'none'; script-src 'nonce-%s'; style-src "
             "'nonce-%s'; connect-src 'self'; base-uri 'none'; "
             "form-action 'none'; frame-ancestors 'none'" % (nonce, nonce)),
            ('X-Content-Type-Options', 'nosniff'),
            ('Referrer-Policy', 'no-referrer')])
        return [body]

    @classmethod
    def parse_conf(cls, name, conf):
        refresh = conf.get_float(name, 'refresh', 2.0)
        if refresh <= 0:
            raise ConfError('[%s] refresh must be above 0 (seconds between '
                            'the page\'s updates).' % name)
        return (conf.get(name, 'path', '/stats'), refresh,
                conf.get(name, 'metrics_path', '/metrics') or None)


class WSGIHealth(object):
    """Readiness and liveness probes, for load balancers and Kubernetes;
    put it first in the chain.

    ``ready_path`` (default /readyz): 200 while this brimd serves, 503
    once it drains or its main process has said it is not ready
    (shutdown_delay).  ``live_path`` (default /livez): 200 while the main
    process supervises this worker (it is still the worker's parent and
    the worker's heartbeat is fresh), 503 otherwise.  Other paths go to
    the next app.  Probes log no request line unless ``log_probes``.
    """

    options = ('ready_path', 'live_path', 'log_probes')

    #: How old a heartbeat may be while the worker still counts as
    #: supervised: workers beat once a second.
    STALE_SECONDS = 5.0

    def __init__(self, name, parsed_conf, next_app):
        self.name = name
        self.next_app = next_app
        self.ready_path, self.live_path, self.log_probes = parsed_conf

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path == self.ready_path:
            ok, words = self._ready(env['brim']), ('ready', 'draining')
        elif path == self.live_path:
            ok, words = self._live(env), ('live', 'unsupervised')
        else:
            return self.next_app(env, start_response)
        if not self.log_probes:
            env['brim.log_request'] = False
        body = (words[0] if ok else words[1]).encode('ascii') + b'\n'
        start_response('200 OK' if ok else '503 Service Unavailable', [
            ('Content-Type', 'text/plain'),
            ('Content-Length', str(len(body))),
            ('Cache-Control', 'no-store')])
        return [body]

    @staticmethod
    def _ready(subserver):
        return (not subserver.draining and
                subserver.server.stats_layout.ready())

    def _live(self, env):
        beat = env['brim.stats'].heartbeat()
        return (not env['brim'].orphaned() and
                time.time() - beat < self.STALE_SECONDS)

    @classmethod
    def parse_conf(cls, name, conf):
        paths = (conf.get(name, 'ready_path', '/readyz'),
                 conf.get(name, 'live_path', '/livez'))
        for option, path in zip(('ready_path', 'live_path'), paths):
            if not path.startswith('/'):
                raise ConfError('[%s] %s must start with /, not %r.'
                                % (name, option, path))
        return paths + (conf.get_bool(name, 'log_probes', False),)


class TCPEcho(object):
    """Echoes what a TCP client sends until it closes.

    Option: ``chunk_read`` (default 65536), the most read per echo.
    """

    options = ('chunk_read',)

    def __init__(self, name, parsed_conf):
        self.name = name
        self.chunk_read = parsed_conf

    def __call__(self, subserver, stats, sock, ip, port):
        stats.incr('byte_count', 0)
        while True:
            data = sock.recv(self.chunk_read)
            if not data:
                return
            sock.sendall(data)
            stats.incr('byte_count', len(data))

    @classmethod
    def parse_conf(cls, name, conf):
        return conf.get_int(name, 'chunk_read', 65536)

    @classmethod
    def stats_conf(cls, name, conf):
        return [('byte_count', 'sum')]


class UDPEcho(object):
    """Sends each datagram back to whoever sent it."""

    options = ()

    def __init__(self, name, parsed_conf):
        self.name = name

    def __call__(self, subserver, stats, sock, datagram, ip, port):
        sock.sendto(datagram, (ip, port))
        stats.incr('datagram_count')

    @classmethod
    def stats_conf(cls, name, conf):
        return [('datagram_count', 'sum')]


class DaemonSample(object):
    """Logs a status line every ``interval`` seconds (default 60)."""

    options = ('interval',)

    def __init__(self, name, parsed_conf):
        self.name = name
        self.interval = parsed_conf

    def __call__(self, subserver, stats):
        while True:
            stats.incr('iterations')
            stats.set('last_run', time.time())
            subserver.logger.info('%s sample daemon alive: %d iterations',
                                  self.name, stats.get('iterations'))
            time.sleep(self.interval)

    @classmethod
    def parse_conf(cls, name, conf):
        interval = conf.get_float(name, 'interval', 60.0)
        if interval <= 0:
            raise ConfError('[%s] interval must be above 0.' % name)
        return interval

    @classmethod
    def stats_conf(cls, name, conf):
        return [('iterations', 'daemon'), ('last_run', 'daemon')]


# ---------------------------------------------------------------------------
# brim.http: responses that are exceptions and WSGI apps; quoting; dates
# ---------------------------------------------------------------------------

class HTTPException(Exception):
    """An HTTP response that can be raised, and is a WSGI app.

    ``return HTTPNotFound()(env, start_response)`` answers with it under
    any WSGI server; ``raise HTTPNotFound()`` from inside an app's call
    makes brim answer with it.  ``body`` (str or bytes) defaults to the
    status, such as ``404 Not Found``; ``headers`` is a dict or a list of
    (name, value) pairs.  Subclasses set ``code``.
    """

    code = 500

    def __init__(self, body=None, headers=None):
        self.status = _status(self.code)
        Exception.__init__(self, self.status)
        if body is None:
            body = self.status + '\n'
        self.body = body.encode('utf-8') if isinstance(body, str) else body
        if hasattr(headers, 'items'):
            headers = headers.items()
        self.headers = [(str(name), str(value))
                        for name, value in headers or ()]

    def __call__(self, env, start_response):
        status, headers, body = _plain_answer(
            self.code, self.body, self.headers, 'text/plain; charset=utf-8')
        start_response(status, headers)
        return [body]


def _status_class(code, name):
    """The HTTPException subclass answering ``code``."""
    return type(name, (HTTPException,), {
        'code': code, '__module__': __name__, '__qualname__': name,
        '__doc__': 'Answers %d %s.' % (code, _RESPONSE_REASONS[code])})


# One class per status, as raisable names; they differ only in the code.
HTTPOk = _status_class(200, 'HTTPOk')
HTTPCreated = _status_class(201, 'HTTPCreated')
HTTPAccepted = _status_class(202, 'HTTPAccepted')
HTTPNoContent = _status_class(204, 'HTTPNoContent')
HTTPPartialContent = _status_class(206, 'HTTPPartialContent')
HTTPMovedPermanently = _status_class(301, 'HTTPMovedPermanently')
HTTPFound = _status_class(302, 'HTTPFound')
HTTPSeeOther = _status_class(303, 'HTTPSeeOther')
HTTPNotModified = _status_class(304, 'HTTPNotModified')
HTTPTemporaryRedirect = _status_class(307, 'HTTPTemporaryRedirect')
HTTPPermanentRedirect = _status_class(308, 'HTTPPermanentRedirect')
HTTPBadRequest = _status_class(400, 'HTTPBadRequest')
HTTPUnauthorized = _status_class(401, 'HTTPUnauthorized')
HTTPForbidden = _status_class(403, 'HTTPForbidden')
HTTPNotFound = _status_class(404, 'HTTPNotFound')
HTTPMethodNotAllowed = _status_class(405, 'HTTPMethodNotAllowed')
HTTPRequestTimeout = _status_class(408, 'HTTPRequestTimeout')
HTTPConflict = _status_class(409, 'HTTPConflict')
HTTPGone = _status_class(410, 'HTTPGone')
HTTPLengthRequired = _status_class(411, 'HTTPLengthRequired')
HTTPPreconditionFailed = _status_class(412, 'HTTPPreconditionFailed')
HTTPRequestEntityTooLarge = _status_class(413, 'HTTPRequestEntityTooLarge')
HTTPRequestURITooLong = _status_class(414, 'HTTPRequestURITooLong')
HTTPUnsupportedMediaType = _status_class(415, 'HTTPUnsupportedMediaType')
HTTPRequestedRangeNotSatisfiable = _status_class(
    416, 'HTTPRequestedRangeNotSatisfiable')
HTTPTooManyRequests = _status_class(429, 'HTTPTooManyRequests')
HTTPInternalServerError = _status_class(500, 'HTTPInternalServerError')
HTTPNotImplemented = _status_class(501, 'HTTPNotImplemented')
HTTPBadGateway = _status_class(502, 'HTTPBadGateway')
HTTPServiceUnavailable = _status_class(503, 'HTTPServiceUnavailable')
HTTPGatewayTimeout = _status_class(504, 'HTTPGatewayTimeout')


def http_date(when=None):
    """``when`` (seconds since the epoch; default now) as an HTTP date:
    ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(when))


def parse_http_date(text):
    """Seconds since the epoch for an HTTP date in any of the three forms
    RFC 9110 allows, or None when ``text`` is not one."""
    import email.utils      # only here: it costs every start some ms
    try:
        parsed = email.utils.parsedate_tz(text or '')
        return None if parsed is None else email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# ---------------------------------------------------------------------------
# brim.httpform: multipart/form-data, streamed
# ---------------------------------------------------------------------------

class FormInvalid(Exception):
    """A form body brim cannot parse; the text says why."""


# '; name=value' or '; name="quoted \" value"' (or a stray ';').
_PARAM_RE = re.compile(r'[ \t]*;[ \t]*(?:([^\s=;"]+)[ \t]*=[ \t]*'
                       r'(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*)))?[ \t]*')
_QUOTED_PAIR_RE = re.compile(r'\\([\\"])')


def parse_attrs(header):
    """``form-data; name="x"; filename="y"`` as ``('form-data', {'name':
    'x', 'filename': 'y'})``.

    The value and the attribute names are lower-cased; attribute values
    are kept as sent, with ``\\"`` and ``\\\\`` unescaped.  An RFC 2231
    ``filename*=utf-8''caf%C3%A9`` (as the email package writes non-ASCII
    names) is decoded into ``filename``, and wins over a plain one.  Raises
    FormInvalid for text it cannot split into attributes or decode.
    """
    value, semicolon, rest = header.partition(';')
    params = semicolon + rest
    attrs = {}
    extended = {}
    pos = 0
    while pos < len(params):
        match = _PARAM_RE.match(params, pos)
        if not match:
            raise FormInvalid('cannot parse the attributes of %r'
                              % header[:200])
        name, quoted, plain = match.groups()
        if name and name.endswith('*'):
            extended[name[:-1].lower()] = _decode_rfc2231(plain or '')
        elif name:
            attrs[name.lower()] = (plain if quoted is None else
                                   _QUOTED_PAIR_RE.sub(r'\1', quoted))
        pos = match.end()
    attrs.update(extended)
    return value.strip().lower(), attrs


def _decode_rfc2231(text):
    """``charset'language'percent-encoded`` as text."""
    charset, _, rest = text.partition("'")
    encoded = rest.partition("'")[2]
    try:
        return unquote_to_bytes(encoded).decode(charset or 'us-ascii')
    except (LookupError, UnicodeDecodeError):
        raise FormInvalid('cannot decode the attribute value %r'
                          % text[:100])


def iter_form(env, read_size=65536, max_parts=1000, max_header_size=16384,
              max_part_size=None):
    """The parts of a ``multipart/form-data`` request body, streamed.

    Yields ``(headers, part)`` per part: ``headers`` is a dict of its
    header fields (lower-case names), ``part`` a file-like with ``read``
    and ``readline`` that returns b'' at the part's end.  Read a part
    before asking for the next; what is left of it is skipped.  Nothing is
    held but about ``read_size`` bytes (or one part's header), so an upload
    of any size passes in bounded memory.

    Raises FormInvalid (at once for a wrong Content-Type, else while
    iterating) for a malformed body, more than ``max_parts`` parts, a part
    header over ``max_header_size`` bytes or, when set, a part over
    ``max_part_size`` bytes.
    """
    content_type, attrs = parse_attrs(env.get('CONTENT_TYPE') or '')
    if content_type != 'multipart/form-data':
        raise FormInvalid('the Content-Type is %r, not multipart/form-data'
                          % content_type[:100])
    boundary = attrs.get('boundary', '')
    if not 0 < len(boundary) <= 70 or not boundary.isascii():
        raise FormInvalid('the boundary must be 1 to 70 ASCII characters')
    if read_size < 1:
        raise ValueError('read_size must be at least 1')
    return _FormParts(env['wsgi.input'], boundary.encode('ascii'),
                      read_size, max_parts, max_header_size, max_part_size)


class _FormParts(object):
    """iter_form's iterator: finds delimiters in a window over the body.

    ``buf[pos:data_end]`` is known to be the current part's data;
    ``found`` says a delimiter starts at ``data_end``.  Only the tail that
    could still be the start of a delimiter is ever kept back, so a part's
    data goes out in pieces of up to ``read_size`` bytes.
    """

    def __init__(self, body, boundary, read_size, max_parts,
                 max_header_size, max_part_size):
        self.body = body
        self.delimiter = b'\r\n--' + boundary
        # The first delimiter comes without the CRLF before it; one put in
        # front lets every delimiter be found the same way.
        self.buf = b'\r\n'
        self.pos = self.data_end = 0
        self.found = False
        self.between = False        # past a delimiter, before a head
        self.finished = False       # past the close delimiter
        self.read_size = read_size
        self.max_parts = max_parts
        self.max_header_size = max_header_size
        self.max_part_size = max_part_size
        self.count = 0
        self.part = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.part is not None:
            self.part.skip()
        else:
            while self.chunk(self.read_size):
                pass                # the preamble, which carries nothing
        if self.finished:
            raise StopIteration
        self.count += 1
        if self.count > self.max_parts:
            raise FormInvalid('more than %d parts' % self.max_parts)
        headers = self._headers()
        self.between = False
        self.part = _FormPart(self, self.count, self.max_part_size)
        return headers, self.part

    def chunk(self, size, until=None):
        """Up to ``size`` bytes of the current part (ending at the first
        ``until`` byte string, when given); b'' at the part's end."""
        if self.between:
            return b''
        while self.pos == self.data_end:
            if self.found:
                self._pass_delimiter()
                return b''
            self._scan()
        end = min(self.data_end, self.pos + size)
        if until is not None:
            at = self.buf.find(until, self.pos, end)
            if at >= 0:
                end = at + len(until)
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def _scan(self):
        """Find how far the window holds part data; read when none."""
        at = self.buf.find(self.delimiter, self.pos)
        if at >= 0:
            self.data_end, self.found = at, True
            return
        self.data_end = max(self.pos,
                            len(self.buf) - len(self.delimiter) + 1)
        if self.data_end == self.pos:
            self._fill('a part')

    def _fill(self, inside):
        """Read more of the body, dropping what was consumed."""
        data = self.body.read(self.read_size)
        if not data:
            raise FormInvalid('the body ended inside %s' % inside)
        self.buf = self.buf[self.pos:] + data
        self.data_end -= self.pos
        self.pos = 0

    def _ensure(self, size, inside):
        while len(self.buf) - self.pos < size:
            self._fill(inside)

    def _pass_delimiter(self):
        """Step over a delimiter onto the next head, or the close."""
        self.pos += len(self.delimiter)
        self.found = False
        self.between = True
        self._ensure(2, 'a boundary line')
        if self.buf.startswith(b'--', self.pos):
            self.finished = True    # what follows (the epilogue) is ignored
            return
        end = self._find(b'\r\n', 128, 'a boundary line')
        if self.buf[self.pos:end].strip(b' \t'):
            raise FormInvalid('a boundary is followed by %r'
                              % self.buf[self.pos:end][:40])
        self.pos = self.data_end = end + 2

    def _find(self, marker, limit, inside):
        """Where ``marker`` starts within ``limit`` bytes, reading more as
        needed; FormInvalid when it is not there."""
        while True:
            at = self.buf.find(marker, self.pos,
                               self.pos + limit + len(marker))
            if at >= 0:
                return at
            if len(self.buf) - self.pos >= limit + len(marker):
                raise FormInvalid('%s is over %d bytes' % (inside, limit))
            self._fill(inside)

    def _headers(self):
        """The next part's header fields: {lower-case name: value}."""
        self._ensure(2, 'a part header')
        if self.buf.startswith(b'\r\n', self.pos):
            end, after = self.pos, self.pos + 2     # no header fields
        else:
            end = self._find(b'\r\n\r\n', self.max_header_size,
                             'a part header')
            after = end + 4
        block = self.buf[self.pos:end]
        headers = {}
        for line in block.split(b'\r\n') if block else ():
            name, colon, value = line.partition(b':')
            if (not colon or not _TOKEN_RE.fullmatch(name) or
                    _BAD_VALUE_RE.search(value)):
                raise FormInvalid('bad part header line %r' % line[:80])
            name = name.decode('ascii').lower()
            if name in headers:
                raise FormInvalid('a part has two %s headers' % name)
            headers[name] = value.strip(b' \t').decode('utf-8', 'replace')
        self.pos = self.data_end = after
        return headers


class _FormPart(object):
    """One part's data as a file; b'' at its end, or once the next part
    has been asked for."""

    def __init__(self, parts, number, limit):
        self.parts = parts
        self.number = number
        self.left = limit           # None: no limit

    def _chunk(self, size, until=None):
        if self.parts.count != self.number:
            return b''
        data = self.parts.chunk(size, until)
        if self.left is not None:
            self.left -= len(data)
            if self.left < 0:
                raise FormInvalid('a part is over max_part_size (%d bytes)'
                                  % self.parts.max_part_size)
        return data

    def read(self, size=-1):
        if size is not None and size >= 0:
            return self._chunk(size)
        return b''.join(iter(lambda: self._chunk(self.parts.read_size),
                             b''))

    def readline(self, size=-1):
        """Through the next b'\\n', or at most ``size`` bytes of it."""
        pieces = []
        left = size if size is not None and size >= 0 else None
        while left != 0:
            data = self._chunk(self.parts.read_size if left is None else
                               min(left, self.parts.read_size), b'\n')
            if not data:
                break
            pieces.append(data)
            if left is not None:
                left -= len(data)
            if data.endswith(b'\n'):
                break
        return b''.join(pieces)

    def __iter__(self):
        return iter(self.readline, b'')

    def skip(self):
        """Read and drop what is left of the part."""
        while self._chunk(self.parts.read_size):
            pass


# ---------------------------------------------------------------------------
# WSGIFS: files from a directory
# ---------------------------------------------------------------------------

# 'bytes=first-last', 'bytes=first-' or 'bytes=-suffix'; 19 digits at most,
# so no number is too big to handle.  Several ranges do not match: brim
# then answers the whole file, as RFC 9110 allows.
_RANGE_RE = re.compile(r'(?i:bytes)[ \t]*=[ \t]*([0-9]{0,19})[ \t]*-'
                       r'[ \t]*([0-9]{0,19})')


class WSGIFS(object):
    """Serves the files under ``serve_path`` at ``path`` (default /).

    GET and HEAD, with Last-Modified, a strong ETag, 304 answers to
    If-None-Match and If-Modified-Since, and one byte Range (206, or 416
    when it starts past the end).  A directory answers its index.html, else
    a listing.  Nothing outside ``serve_path`` is served: ``..`` segments
    are 403, and a symlink that resolves outside it is 404.
    """

    options = ('path', 'serve_path')

    def __init__(self, name, parsed_conf, next_app):
        self.name = name
        self.next_app = next_app
        self.path, self.root = parsed_conf
        self.root_prefix = os.path.join(self.root, '')

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path != self.path and not path.startswith(self.path + '/'):
            return self.next_app(env, start_response)
        try:
            if env['REQUEST_METHOD'] not in ('GET', 'HEAD'):
                raise HTTPMethodNotAllowed(headers=[('Allow', 'GET, HEAD')])
            return self._serve(env, start_response,
                               self._names(path[len(self.path):]))
        except HTTPException as response:
            return response(env, start_response)

    def _names(self, rest):
        """The request path's names below serve_path.

        A name that could climb out (``..`` however it was spelled; brim
        has decoded %2e%2e already) or hold a separator is refused 403.
        """
        names = []
        for name in rest.split('/'):
            if name in ('', '.'):
                continue
            if name == '..' or '\\' in name or '\0' in name:
                raise HTTPForbidden()
            names.append(os.fsdecode(name.encode('latin-1')))
        return names

    def _open(self, path):
        """(fd, stat) of ``path`` where it really is; 404 when that is
        outside serve_path, or it cannot be opened.

        O_NOFOLLOW: a symlink swapped in after the check is not followed;
        O_NONBLOCK: a FIFO cannot hold the worker (only regular files and
        directories are served).
        """
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root_prefix):
            raise HTTPNotFound()
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise HTTPNotFound()
        return fd, os.fstat(fd)

    def _serve(self, env, start_response, names):
        target = os.path.join(self.root, *names)
        fd, info = self._open(target)
        slash = env['PATH_INFO'].endswith('/')
        if S_ISREG(info.st_mode) and not slash:
            return self._file(env, start_response, fd, info, names[-1])
        os.close(fd)
        if not S_ISDIR(info.st_mode):
            raise HTTPNotFound()
        url = self._url(env, names)
        if not slash:
            raise HTTPMovedPermanently(headers=[('Location', url)])
        try:
            fd, info = self._open(os.path.join(target, 'index.html'))
        except HTTPNotFound:
            return self._listing(start_response, target, url, names)
        if S_ISREG(info.st_mode):
            return self._file(env, start_response, fd, info, 'index.html')
        os.close(fd)
        return self._listing(start_response, target, url, names)

    def _url(self, env, names):
        """The quoted URL path of directory ``names``, with its slash.

        Built from the checked names, so it never starts '//host/' (which
        a browser would take for another site).
        """
        prefix = (env.get('SCRIPT_NAME', '') + self.path).encode('latin-1')
        return quote(prefix + b'/' + b''.join(os.fsencode(name) + b'/'
                                              for name in names))

    def _file(self, env, start_response, fd, info, name):
        """Answer the regular file open as ``fd``, whole or one range."""
        fp = open(fd, 'rb', buffering=0)
        try:
            kind, coding = mimetypes.guess_type(name)
            etag = '"%x-%x"' % (info.st_mtime_ns, info.st_size)
            headers = [('ETag', etag),
                       ('Last-Modified', http_date(info.st_mtime))]
            if self._not_modified(env, etag, int(info.st_mtime)):
                raise HTTPNotModified(headers=headers)
            headers += [
                ('Content-Type', kind if kind and not coding else
                 'application/octet-stream'),
                ('Accept-Ranges', 'bytes'),
                ('X-Content-Type-Options', 'nosniff')]
            first, length, status = self._range(env, info, etag)
            if status.startswith('206'):
                headers.append(('Content-Range', 'bytes %d-%d/%d' % (
                    first, first + length - 1, info.st_size)))
            headers.append(('Content-Length', str(length)))
            fp.seek(first)
            start_response(status, headers)
        except BaseException:
            fp.close()
            raise
        wrapper = env.get('wsgi.file_wrapper', _FileWrapper)
        return wrapper(_FileRange(fp, length), 65536)

    @staticmethod
    def _not_modified(env, etag, mtime):
        """True for a conditional GET the client's copy satisfies."""
        tags = env.get('HTTP_IF_NONE_MATCH')
        if tags is not None:
            # The weak comparison RFC 9110 asks for here.
            return any(tag.strip() in ('*', etag, 'W/' + etag)
                       for tag in tags.split(','))
        since = parse_http_date(env.get('HTTP_IF_MODIFIED_SINCE'))
        return since is not None and mtime <= since

    @staticmethod
    def _range(env, info, etag):
        """(first byte, length, status) to answer.

        A Range that does not parse, asks for several ranges, or has a
        stale If-Range is ignored (the whole file, 200); one that starts
        past the end is 416.
        """
        size = info.st_size
        whole = 0, size, '200 OK'
        match = _RANGE_RE.fullmatch(env.get('HTTP_RANGE', '').strip())
        if not match or not any(match.groups()):
            return whole
        if_range = env.get('HTTP_IF_RANGE', '').strip()
        if (if_range and if_range != etag and
                parse_http_date(if_range) != int(info.st_mtime)):
            return whole
        first, last = match.groups()
        if not first:                       # the last N bytes
            first, last = max(0, size - int(last)), size - 1
        elif last and int(last) < int(first):
            return whole                    # 'bytes=5-2' is not a range
        else:
            first = int(first)
            last = min(int(last), size - 1) if last else size - 1
        if first >= size:
            raise HTTPRequestedRangeNotSatisfiable(
                headers=[('Content-Range', 'bytes */%d' % size)])
        return first, last - first + 1, '206 Partial Content'

    def _listing(self, start_response, directory, url, names):
        """A page listing ``directory``: folders, then files, by name."""
        rows = []
        with os.scandir(directory) as entries:
            for entry in entries:
                row = self._listing_row(entry)
                if row is not None:
                    rows.append(row)
        rows.sort()
        title = html.escape(_display_name(unquote_to_bytes(url)))
        lines = [_LISTING_HEAD % (title, title)]
        if names:
            lines.append('<tr><td><a href="../">../</a></td><td></td>'
                         '<td></td></tr>')
        for is_file, name, size, mtime in rows:
            slash = '' if is_file else '/'
            lines.append('<tr><td><a href="%s%s">%s%s</a></td><td>%s</td>'
                         '<td>%s</td></tr>' % (
                             quote(name, safe=''), slash,
                             html.escape(_display_name(name)), slash, size,
                             time.strftime('%Y-%m-%d %H:%M',
                                           time.gmtime(mtime))))
        lines.append('</table>\n</body>\n</html>\n')
        body = '\n'.join(lines).encode('utf-8')
        start_response('200 OK', [('Content-Type', 'text/html; charset=utf-8'),
                                  ('Content-Length', str(len(body)))])
        return [body]

    def _listing_row(self, entry):
        """(is a file, name as bytes, size text, mtime), or None to leave
        it out: a dangling link, or one that leads outside serve_path."""
        try:
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if real != self.root and not real.startswith(
                        self.root_prefix):
                    return None
            info = entry.stat()
        except OSError:
            return None
        name = os.fsencode(entry.name)
        if S_ISDIR(info.st_mode):
            return False, name, '-', info.st_mtime
        return True, name, '{:,}'.format(info.st_size), info.st_mtime

    @classmethod
    def parse_conf(cls, name, conf):
        path = conf.get(name, 'path', '/').strip()
        if not path.startswith('/'):
            raise ConfError('[%s] path %r must start with /.' % (name, path))
        serve_path = conf.get_path(name, 'serve_path')
        if not serve_path:
            raise ConfError('[%s] serve_path must be set to the directory '
                            'to serve.' % name)
        root = os.path.realpath(serve_path)
        try:
            os.listdir(root)
        except OSError as err:
            raise ConfError('[%s] serve_path %s is not a readable directory '
                            '(%s).' % (name, serve_path,
                                       err.strerror or err))
        # As PATH_INFO spells it: the UTF-8 bytes, one character each.
        return path.rstrip('/').encode('utf-8').decode('latin-1'), root


_LISTING_HEAD = '''<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Index of %s</title>
<style>
body { font: 14px/1.5 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.2em; }
td, th { padding: 0.1em 1.5em 0.1em 0; text-align: left; }
td:nth-child(2) { text-align: right; }
a { text-decoration: none; }
</style>
</head>
<body>
<h1>Index of %s</h1>
<table>
<tr><th>Name</th><th>Size</th><th>Modified (UTC)</th></tr>'''


def _display_name(name):
    """A file name (bytes) as text to show; undecodable bytes as U+FFFD."""
    return name.decode('utf-8', 'replace')


class _FileRange(object):
    """``length`` bytes of an open file from where it stands.

    WSGIFS hands this to wsgi.file_wrapper: a server that reads it stops at
    the range's end, and brim's os.sendfile path still finds fileno() and
    tell() (and sends no more than the Content-Length).
    """

    def __init__(self, fp, length):
        self.fp = fp
        self.left = length
        self.fileno = fp.fileno
        self.tell = fp.tell
        self.close = fp.close

    def read(self, size=-1):
        if size is None or size < 0 or size > self.left:
            size = self.left
        data = self.fp.read(size) if size else b''
        self.left -= len(data)
        return data


# ---------------------------------------------------------------------------
# WSGIBasicAuth: HTTP Basic authentication against a file of scrypt hashes
# ---------------------------------------------------------------------------

# scrypt's cost: about 16 MiB and a few tens of ms per check, which is what
# makes guessing slow.  Files may carry other costs, within these bounds.
_SCRYPT_COST = (2 ** 14, 8, 1)
_SCRYPT_MAXMEM = 2 ** 26
# scrypt checks run at once per WSGIBasicAuth: each holds ~16 MiB, so a
# crowd of wrong passwords cannot take a worker's memory.
_HASH_SLOTS = 2
_HASH_RE = re.compile(r'\$scrypt\$n=([0-9]{1,8}),r=([0-9]{1,3}),'
                      r'p=([0-9]{1,3})\$([A-Za-z0-9+/]{16,}={0,2})'
                      r'\$([A-Za-z0-9+/]{22,88}={0,2})')


def _hash_password(password):
    """``password`` (str) as ``$scrypt$n=N,r=R,p=P$salt$hash``."""
    n, r, p = _SCRYPT_COST
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode('utf-8'), salt=salt, n=n, r=r,
                            p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    return '$scrypt$n=%d,r=%d,p=%d$%s$%s' % (
        n, r, p, base64.b64encode(salt).decode('ascii'),
        base64.b64encode(digest).decode('ascii'))


def _parse_hash(text):
    """(n, r, p, salt, digest) of a hash _hash_password made, or None."""
    match = _HASH_RE.fullmatch(text)
    if not match:
        return None
    n, r, p = (int(group) for group in match.groups()[:3])
    if (n < 2 or n & (n - 1) or not r or not p or
            128 * r * (n + p + 2) > _SCRYPT_MAXMEM):
        return None
    return (n, r, p, base64.b64decode(match.group(4)),
            base64.b64decode(match.group(5)))


def _check_password(password, params):
    """True when ``password`` (bytes) hashes to ``params``' digest."""
    n, r, p, salt, digest = params
    candidate = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p,
                               maxmem=_SCRYPT_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(candidate, digest)


def _read_users(path):
    """({name: hash params}, [what is wrong with each bad line]) from an
    auth file of ``name hash`` lines.

    Blank lines and ``#`` comments are skipped, and so is a bad line: the
    users are what the good lines say, whatever was read before, so every
    worker holds the same ones for the same file, and a slip on one line
    keeps nobody else out and lets nobody in.  A name on several lines
    takes the last (appending a hash-password line changes a password).
    Raises OSError when the file cannot be read.
    """
    users = {}
    problems = []
    with open(path, 'rb') as fp:
        for number, line in enumerate(fp, 1):
            try:
                user = _parse_user_line(line)
            except ValueError:
                problems.append(
                    'line %d is not "name $scrypt$..." (a name without a '
                    'colon, then a hash from: python3 brim.py hash-password '
                    'NAME)' % number)
                continue
            if user is not None:
                name, params = user
                users[name] = params
    return users, problems


def _parse_user_line(line):
    """(name, hash params) of an auth file line (bytes), None for a blank
    line or a comment; ValueError for anything else."""
    fields = line.decode('utf-8').split()   # UnicodeDecodeError: ValueError
    if not fields or fields[0].startswith('#'):
        return None
    name, encoded = fields                  # ValueError unless two
    params = _parse_hash(encoded)           # binascii.Error: ValueError
    if params is None or ':' in name:
        raise ValueError('not a name and a hash')
    return name, params


def _file_version(path):
    """What changes when the file at ``path`` is rewritten."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


class WSGIBasicAuth(object):
    """Lets through requests with a right user and password (HTTP Basic).

    Users are ``name hash`` lines in ``auth_path``; ``python3 brim.py
    hash-password NAME`` makes a line.  Others get 401 with a Basic
    challenge for ``realm``.  A right request goes on with REMOTE_USER set
    (the request log shows it) and Authorization removed.  The file is
    re-read when it changes (checked every ``check_interval`` seconds); a
    bad line is skipped and logged, a file that cannot be read leaves the
    users before in place.  ``start`` and ``check`` refuse a file with a
    bad line.  ``unauthed_paths`` (default /favicon.ico) pass without
    credentials.
    """

    options = ('auth_path', 'realm', 'unauthed_paths', 'check_interval')

    def __init__(self, name, parsed_conf, next_app):
        self.name = name
        self.next_app = next_app
        (self.auth_path, realm, self.unauthed_paths, self.check_interval,
         users, self.version) = parsed_conf
        self.challenge = 'Basic realm="%s", charset="UTF-8"' % (
            realm.replace('\\', '\\\\').replace('"', '\\"'))
        # The users, and the passwords that passed since they were read
        # (as HMACs with a key of this process): swapped as one, so a
        # reload never pairs new users with old passwords.
        self.table = (users, {})
        self.key = os.urandom(32)
        self.next_check = time.monotonic() + self.check_interval
        self.trouble = None         # why the file was last refused
        self.reload_lock = threading.Lock()
        self.hash_slots = threading.BoundedSemaphore(_HASH_SLOTS)

    def __call__(self, env, start_response):
        if env['PATH_INFO'] in self.unauthed_paths:
            return self.next_app(env, start_response)
        self._reload_if_changed(env['brim.logger'])
        # Popped either way: no app or header log downstream sees it.
        user = self._authenticate(env.pop('HTTP_AUTHORIZATION', ''))
        if user is None:
            return HTTPUnauthorized(headers=[
                ('WWW-Authenticate', self.challenge)])(env, start_response)
        env['REMOTE_USER'] = user
        return self.next_app(env, start_response)

    def _authenticate(self, authorization):
        """The user a Basic Authorization value proves, or None."""
        scheme, _, credentials = authorization.strip().partition(' ')
        if scheme.lower() != 'basic' or len(credentials) > 4096:
            return None
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
            user, colon, password = decoded.decode('utf-8').partition(':')
        except ValueError:      # binascii.Error and UnicodeDecodeError too
            return None
        if colon and self._check(user, password.encode('utf-8')):
            return user
        return None

    def _check(self, user, password):
        """True for ``user``'s right password, in a time that does not say
        whether ``user`` exists."""
        users, passed = self.table
        mark = hmac.new(self.key, password, hashlib.sha256).digest()
        if user in passed and hmac.compare_digest(mark, passed[user]):
            return True         # no need to pay for scrypt again
        params = users.get(user)
        if params is None:
            if not users:
                return False
            params = next(iter(users.values()))     # the same work
        with self.hash_slots:
            right = _check_password(password, params) and user in users
        if right:
            passed[user] = mark
        return right

    def _reload_if_changed(self, logger):
        """Re-read auth_path when it changed; one thread does it."""
        now = time.monotonic()
        if (now < self.next_check or
                not self.reload_lock.acquire(blocking=False)):
            return
        try:
            self.next_check = now + self.check_interval
            try:
                version = _file_version(self.auth_path)
                if version == self.version:
                    return
                self.version = version
                users, problems = _read_users(self.auth_path)
            except OSError as err:
                # Logged once, not at every check until it is fixed.
                if self.trouble != str(err):
                    self.trouble = str(err)
                    logger.error('[%s] auth_path %s: %s; keeping the %d '
                                 'users read before', self.name,
                                 self.auth_path, _one_line(err),
                                 len(self.table[0]))
                return
            self.table = (users, {})
            self.trouble = None
            for problem in problems:    # once: this version is read once
                logger.error('[%s] auth_path %s: %s; skipping it',
                             self.name, self.auth_path, problem)
            logger.info('[%s] read %d users from %s', self.name, len(users),
                        self.auth_path)
        finally:
            self.reload_lock.release()

    @classmethod
    def parse_conf(cls, name, conf):
        auth_path = conf.get_path(name, 'auth_path')
        if not auth_path:
            raise ConfError('[%s] auth_path must name a file of "name hash" '
                            'lines (python3 brim.py hash-password NAME '
                            'prints one).' % name)
        try:
            version = _file_version(auth_path)
            users, problems = _read_users(auth_path)
        except OSError as err:
            raise ConfError('[%s] auth_path %s cannot be read: %s.'
                            % (name, auth_path, err.strerror or err))
        # Refused here, where someone is watching; a running brimd skips
        # such a line instead (see _read_users).
        if problems:
            raise ConfError('[%s] auth_path %s: %s.'
                            % (name, auth_path, problems[0]))
        realm = conf.get(name, 'realm', 'brim')
        try:
            bad_realm = _BAD_VALUE_RE.search(realm.encode('latin-1'))
        except UnicodeEncodeError:
            bad_realm = True
        if bad_realm:
            raise ConfError('[%s] realm %r must be Latin-1 text without '
                            'control characters.' % (name, realm))
        interval = conf.get_float(name, 'check_interval', 2.0)
        if interval < 0:
            raise ConfError('[%s] check_interval must be 0 or more.' % name)
        unauthed = frozenset(
            conf.get(name, 'unauthed_paths', '/favicon.ico').split())
        return auth_path, realm, unauthed, interval, users, version


# ---------------------------------------------------------------------------
# Supervision: the main process
# ---------------------------------------------------------------------------

_SUBSERVER_KINDS = {'wsgi': WSGISubserver, 'tcp': TCPSubserver,
                    'udp': UDPSubserver, 'daemons': DaemonsSubserver}


def _configure_subservers(server, conf):
    """A configured subserver for each [wsgi], [tcp], [udp] section (and
    their #name variants) and [daemons], in the configuration's order."""
    subservers = []
    for section in conf.sections():
        cls = _SUBSERVER_KINDS.get(section.split('#', 1)[0])
        if cls is None or (section == 'daemons') != (cls.kind == 'daemons'):
            continue
        subserver = cls(server, section)
        subserver.configure(conf)
        subservers.append(subserver)
    if not subservers:
        raise ConfError('No [wsgi], [tcp], [udp] or [daemons] section in '
                        '%s; nothing to serve.' % ', '.join(conf.files))
    return subservers


def _user_to_run_as(settings):
    """(name, uid, gid) to drop to in workers, or (None, None, None)."""
    import grp
    import pwd
    user, group = settings.user, settings.group
    if not user and not group:
        return None, None, None
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ConfError('[brim] user %r does not exist on this host.'
                        % user)
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfError('[brim] group %r does not exist on this '
                            'host.' % group)
    if os.geteuid() != 0 and (entry.pw_uid != os.geteuid() or
                              gid != os.getegid()):
        raise ConfError('[brim] user/group need brimd started as root '
                        '(it is running as uid %d).' % os.geteuid())
    return entry.pw_name, entry.pw_uid, gid


def _exit_reason(status):
    """'exit status N' or 'signal SIGNAME' for a waitpid status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            return 'killed by signal %s' % signal.Signals(signum).name
        except ValueError:
            return 'killed by signal %d' % signum
    return 'exit status %d' % os.WEXITSTATUS(status)


def _pid_alive(pid):
    """True while ``pid`` runs (an exited one its parent has not reaped
    yet, a zombie, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _proc_state(pid) != 'Z'


def _proc_state(pid):
    """The kernel's one-letter state of ``pid`` (R, S, D, Z, ...), or ''."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as fp:
            return fp.read().rsplit(b')', 1)[1].split()[0].decode('ascii')
    except (OSError, IndexError):
        return ''


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap_now():
    """Every (pid, status) of a child that has exited, without waiting."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


class _WorkerSlot(object):
    """The main process's record of one worker or daemon slot."""

    def __init__(self, subserver, index, bucket):
        self.subserver = subserver
        self.index = index
        self.bucket = bucket
        self.pid = None
        self.started = 0.0      # monotonic, for the backoff
        self.started_at = 0.0   # wall clock, for heartbeats and status
        self.due = 0.0          # when to (re)start it, monotonic
        self.failures = 0       # quick deaths in a row, for the backoff
        self.restarts = 0
        self.last_exit = None   # why the previous process of this slot ended
        self.wanted = False     # whether a worker is to run in it now

    def label(self):
        return self.subserver.worker_label(self.index)


class _Supervisor(object):
    """Keeps a process in every wanted worker slot: starts the workers,
    reaps them, restarts a crashed one after a backoff, replaces one that
    asks, starts and drains workers as a subserver scales, and kills a
    hung one (after a stack dump) or a drained one that overstays
    graceful_timeout.

    Besides a replacement's ready pipe, it acts only through its
    collaborators, so it runs the same against fakes: ``fork(worker,
    ready_fd)`` starts a worker process and returns its pid, ``kill(pid,
    signum)`` signals one, ``reap()`` lists the (pid, status) of children
    that exited, ``clock`` (monotonic) times the backoff and the
    deadlines, ``wall_clock`` reads the heartbeats (which workers write
    as time.time()); ``on_restart(worker)`` hears of every restart it
    schedules (the main process counts them for statsd).
    """

    #: A worker that dies sooner than this after starting is backed off.
    STABLE_SECONDS = 10.0
    MAX_BACKOFF = 30.0
    #: How long a hung worker gets to dump its stacks before SIGKILL.
    ABORT_SECONDS = 2.0

    def __init__(self, slots, logger, graceful_timeout, fork, kill=_kill,
                 reap=_reap_now, clock=time.monotonic, wall_clock=time.time,
                 on_restart=lambda worker: None):
        self.slots = slots
        self.logger = logger
        self.graceful_timeout = graceful_timeout
        self.fork = fork
        self.kill = kill
        self.exited = reap
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_restart = on_restart
        self.children = {}      # pid: _WorkerSlot, for every serving process
        self.retired = {}       # pid: SIGKILL deadline of a replaced one
        self.draining = {}      # pid: the _WorkerSlot a retired one served
        self.replacing = {}     # ready pipe: pid its new worker replaces
        self.aborted = {}       # pid: SIGKILL deadline of a hung one
        self.stopping = False

    def pids(self):
        """Every worker process, serving or draining."""
        return list(self.children) + list(self.retired)

    def signal_all(self, signum):
        for pid in self.pids():
            self.kill(pid, signum)

    def adopt(self, pids):
        """Take on a previous generation's workers (after a restart in
        place), to drain once the new ones serve."""
        for pid in pids:
            self.retired[pid] = float('inf')

    def wanted(self):
        return [worker for worker in self.slots if worker.wanted]

    def spawn(self, worker, ready_fd=None):
        worker.bucket.reset()
        worker.bucket.set('_restarts', worker.restarts)
        worker.pid = pid = self.fork(worker, ready_fd)
        worker.started = self.clock()
        worker.started_at = self.wall_clock()
        self.children[pid] = worker

    def tend(self):
        """What the main loop does every turn: reap, restart what is due,
        abort the hung, kill the overdue."""
        self.reap()
        self.respawn_due()
        self.check_heartbeats()
        self.kill_overdue()

    # -- deaths and restarts -------------------------------------------------

    def reap(self):
        """Collect every exited child; schedule restarts for workers.

        As process 1 in a container brimd also inherits orphans; they are
        reaped here too, and ignored.
        """
        for pid, status in self.exited():
            hung = self.aborted.pop(pid, None) is not None
            if self.retired.pop(pid, None) is not None:
                self._drained(pid)
                continue
            worker = self.children.pop(pid, None)
            if worker is not None and not self.stopping:
                self._schedule_restart(worker, pid, status, backoff=not hung)

    def starting_failure(self):
        """While the first workers start: why brimd cannot start (a worker
        exited before its first heartbeat), else None.  One that beat,
        then died, is a crash to restart, not a failure."""
        for pid, status in self.exited():
            if self.retired.pop(pid, None) is not None:
                self._drained(pid)
                continue
            worker = self.children.pop(pid, None)
            if worker is None:
                continue
            if not worker.bucket.heartbeat():
                return '%s exited while starting (%s).' % (
                    worker.label(), _exit_reason(status))
            self._schedule_restart(worker, pid, status)
        return None

    def all_started(self):
        """True once every wanted worker has beaten at least once."""
        return all(w.bucket.heartbeat() for w in self.wanted())

    def _schedule_restart(self, worker, pid, status, backoff=True):
        """Log why ``worker`` died and when it starts again (backed off,
        unless brimd killed it for hanging: that is no crash loop)."""
        now = self.clock()
        lived = now - worker.started
        worker.failures = (worker.failures + 1
                           if lived < self.STABLE_SECONDS and backoff else 0)
        delay = 0.0 if not worker.failures else min(
            self.MAX_BACKOFF, 2.0 ** (worker.failures - 1))
        worker.due = now + delay
        worker.pid = None
        worker.bucket.set('_pid', 0)        # the stats show it down
        worker.bucket.clear_in_flight()
        worker.restarts += 1
        worker.last_exit = '%s after %.1fs' % (_exit_reason(status), lived)
        self.logger.error('%s (pid %d) %s; restarting in %.1fs',
                          worker.label(), pid, worker.last_exit, delay)
        self.on_restart(worker)

    def respawn_due(self):
        now = self.clock()
        for worker in self.wanted():
            if worker.pid is None and worker.due <= now:
                self.spawn(worker)

    def next_due(self):
        """Seconds until the next restart is due (1.0 with none waiting)."""
        waiting = [w.due for w in self.wanted() if w.pid is None]
        return min(waiting) - self.clock() if waiting else 1.0

    # -- replacements --------------------------------------------------------

    def replace(self, pid, reason):
        """Start a new worker in ``pid``'s slot; drain ``pid`` once it serves.

        The new worker's ready pipe reaches EOF when it serves (or dies);
        the main loop then calls replacement_ready.  Until then both
        accept, so the port is never without a worker.
        """
        worker = None if self.stopping else self.children.pop(pid, None)
        if worker is None:
            return
        self.logger.info('%s (pid %d) %s; starting its replacement',
                         worker.label(), pid, reason)
        self.retired[pid] = float('inf')
        self.draining[pid] = worker
        ready_r, ready_w = os.pipe()
        self.replacing[ready_r] = pid
        self.spawn(worker, ready_w)
        os.close(ready_w)

    def replacement_ready(self, ready_r):
        """A replacement started (or died): drain the worker it replaces."""
        if os.read(ready_r, 4096):
            return          # a failure line; the EOF follows
        os.close(ready_r)
        self.drain_retired([self.replacing.pop(ready_r)])

    def drain_retired(self, pids=None):
        """SIGHUP the retired workers ``pids`` (default: all of them);
        they have graceful_timeout to finish."""
        deadline = self.clock() + self.graceful_timeout
        for pid in list(self.retired) if pids is None else pids:
            if pid in self.retired:
                self.retired[pid] = deadline
                self.kill(pid, signal.SIGHUP)

    def _drained(self, pid):
        """A retired worker has exited: its bucket shows it gone, unless
        a new worker serves from the bucket now."""
        worker = self.draining.pop(pid, None)
        if worker is not None and worker.pid is None:
            worker.bucket.set('_pid', 0)
            worker.bucket.clear_in_flight()

    # -- scaling -------------------------------------------------------------

    def scale(self, subserver, count):
        """Have ``count`` workers of ``subserver`` run: start the slots
        below ``count`` that are idle, drain the running ones from
        ``count`` on (each finishes what it serves).  The slots started."""
        started = []
        for worker in self.slots:
            if worker.subserver is not subserver:
                continue
            wanted = worker.index < count
            if wanted and not worker.wanted:
                worker.wanted = True
                worker.failures = 0
                if worker.pid is None and not self.stopping:
                    self.spawn(worker)
                    started.append(worker)
            elif worker.wanted and not wanted:
                worker.wanted = False
                if worker.pid is not None:
                    self._retire(worker)
        return started

    def _retire(self, worker):
        pid = worker.pid
        del self.children[pid]
        worker.pid = None
        self.retired[pid] = float('inf')
        self.draining[pid] = worker
        self.logger.info('%s (pid %d) retired: draining', worker.label(),
                         pid)
        self.drain_retired([pid])

    # -- hung and overdue workers --------------------------------------------

    def check_heartbeats(self):
        """Abort (stack dump, then SIGKILL) workers that stopped beating."""
        now = self.wall_clock()
        for pid, worker in list(self.children.items()):
            timeout = worker.subserver.settings.worker_timeout
            if not timeout or pid in self.aborted:
                continue
            silent = now - max(worker.bucket.heartbeat(), worker.started_at)
            if silent > timeout:
                self._abort(pid, worker, silent, now)

    def _abort(self, pid, worker, silent, now):
        started, latest = worker.bucket.latest_request()
        serving = ''
        if latest:
            serving = '; its latest request, %s, started %.0fs ago' % (
                latest, now - started)
        self.logger.error(
            '%s (pid %d) is hung: no heartbeat for %.0fs (worker_timeout '
            '%gs)%s; aborting it for a stack dump, then killing it',
            worker.label(), pid, silent,
            worker.subserver.settings.worker_timeout, serving)
        self.aborted[pid] = self.clock() + self.ABORT_SECONDS
        self.kill(pid, signal.SIGABRT)
        self.kill(pid, signal.SIGCONT)  # a stopped one dumps and dies too

    def kill_overdue(self):
        """SIGKILL replaced workers past graceful_timeout, hung ones past
        their stack dump."""
        now = self.clock()
        for pids, what in ((self.retired, 'did not finish draining within '
                            'graceful_timeout'),
                           (self.aborted, 'did not exit after SIGABRT')):
            for pid, deadline in list(pids.items()):
                if deadline <= now:
                    self.logger.warning('pid %d %s; killing it', pid, what)
                    pids[pid] = float('inf')
                    self.kill(pid, signal.SIGKILL)

    def wait_all(self, seconds):
        """Reap children until none is left or ``seconds`` pass; then kill
        the rest.  Bounded even then: a child stuck in the kernel (a hung
        disk, say) must not keep brimd from exiting."""
        if self._reaped_all(seconds):
            return
        self.logger.warning('killing %d workers that did not exit in %.0fs',
                            len(self.pids()), seconds)
        self.signal_all(signal.SIGKILL)
        if not self._reaped_all(5.0):
            self.logger.error('workers %s outlived SIGKILL for 5s; exiting '
                              'without them', ' '.join(map(str, sorted(
                                  self.pids()))))

    def _reaped_all(self, seconds):
        """True once every child is reaped, within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            self.reap()
            if not self.pids():
                return True
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True             # no child at all: nothing to wait for
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class _Scaler(object):
    """How many workers each subserver runs, changed while brimd serves:
    ``scale`` (the command, SIGTTIN, SIGTTOU), the _Autoscaler of a
    ``workers = least..most`` subserver, and a restart in place, which
    keeps the counts (``keep``).  The count is the supervisor's wanted
    slots; the stats layout shows it to every reader."""

    def __init__(self, server):
        self.server = server

    def target(self, subserver):
        """How many workers ``subserver`` is to run now."""
        return sum(1 for worker in self.server.slots
                   if worker.subserver is subserver and worker.wanted)

    def scale(self, section, count, asked_by):
        """Scale [``section``] ('*': every [wsgi], [tcp] and [udp] but
        those that scale themselves) to ``count`` workers: N, +N or -N,
        as ``asked_by`` asks (for the log line).  (What to answer, the
        slots started); the answer starts with 'refused:' when nothing was
        done."""
        try:
            plan = [(sub, _scaled_count(sub, self.target(sub), count))
                    for sub in self._scalable(section)]
        except ValueError as err:
            answer, started = 'refused: %s' % err, []
        else:
            lines, started = [], []
            for subserver, wanted in plan:
                lines.append('[%s] %d -> %d workers' % (
                    subserver.name, self.target(subserver), wanted))
                started += self.scale_to(subserver, wanted)
            answer = 'scaled %s' % ', '.join(lines)
        self.server.logger.info('%s: %s', asked_by, answer)
        return answer, started

    def scale_to(self, subserver, count):
        """Run ``count`` workers of ``subserver``; the slots started."""
        started = self.server.supervisor.scale(subserver, count)
        self.server.stats_layout.set_target(subserver, count)
        return started

    def _scalable(self, section):
        """The subservers ``section`` names; ValueError says why none."""
        listeners = [sub for sub in self.server.subservers
                     if sub.kind != 'daemons']
        if section == '*':
            chosen = [sub for sub in listeners
                      if not sub.settings.workers.adaptive]
            if not chosen:
                raise ValueError('no [wsgi], [tcp] or [udp] section with a '
                                 'fixed worker count')
            return chosen
        for sub in self.server.subservers:
            if sub.name == section:
                break
        else:
            raise ValueError('no section [%s]; scale one of: %s' % (
                section, ', '.join(sub.name for sub in listeners)))
        if sub.kind == 'daemons':
            raise ValueError('[daemons] runs one process per daemon; it '
                             'does not scale')
        if sub.settings.workers.adaptive:
            raise ValueError('[%s] workers = %s scales itself; give it a '
                             'fixed count to scale it by hand'
                             % (sub.name, sub.settings.workers))
        return [sub]

    def keep(self, targets):
        """After a restart in place: run the worker counts the previous
        image ran ({section: count}), where the sections are still there
        and may run that many."""
        for subserver in self.server.subservers:
            count = targets.get(subserver.name)
            if count is None or subserver.kind == 'daemons':
                continue
            count = max(1, min(count, subserver.bucket_count))
            _want(self.server.slots, subserver, count)
            self.server.stats_layout.set_target(subserver, count)


def _want(slots, subserver, count):
    """Before the workers start: want the first ``count`` slots of
    ``subserver`` (a running brimd scales through _Supervisor.scale)."""
    for worker in slots:
        if worker.subserver is subserver:
            worker.wanted = worker.index < count


class _Autoscaler(object):
    """``workers = least..most``: adds a worker to a subserver when every
    one of its workers has been busy for UP_SECONDS, retires one after
    QUIET_SECONDS in which none was.

    Busy is read from what each worker keeps in its bucket: the time it
    adds as it ends a request (connection, datagram), and what it has in
    flight.  Over the last second, a worker that spent BUSY of it serving,
    or had requests in flight at both ends of it, is busy; one that
    spent under QUIET and has nothing in flight is quiet.  Nothing is
    asked of the workers: the main process samples the buckets once a
    second.  ``scale(subserver, count)`` does the scaling; ``logger``
    hears each decision, which ``decisions`` keeps for ``status``.
    """

    UP_SECONDS = 3
    QUIET_SECONDS = 10
    BUSY = 0.8
    QUIET = 0.2

    def __init__(self, scale, logger, clock=time.monotonic):
        self.scale = scale
        self.logger = logger
        self.clock = clock
        self.next_sample = 0.0
        self.seen = {}          # name: (when, {pid: (busy usec, in flight)})
        self.busy = {}          # name: seconds every worker was busy
        self.quiet = {}         # name: seconds no worker was busy
        self.decisions = {}     # name: the latest decision, for status

    def tend(self, subservers, wanted):
        """Once a second: sample the subservers that scale themselves;
        ``wanted``: the supervisor's wanted slots."""
        now = self.clock()
        if now < self.next_sample:
            return
        self.next_sample = now + 1.0
        for subserver in subservers:
            if (subserver.kind != 'daemons' and
                    subserver.settings.workers.adaptive):
                self._sample(subserver, [w for w in wanted
                                         if w.subserver is subserver], now)

    def _sample(self, subserver, workers, now):
        name = subserver.name
        seen = {w.pid: (w.bucket.get('_busy_usec'),
                        _in_flight(w.bucket.get('_in_flight')))
                for w in workers if w.pid and w.bucket.heartbeat()}
        when, before = self.seen.get(name, (now, {}))
        self.seen[name] = (now, seen)
        if not seen or set(seen) != set(before) or now <= when:
            return      # a worker started or ended: begin again
        busy = quiet = True
        for pid, (busy_usec, in_flight) in seen.items():
            share = (busy_usec - before[pid][0]) / 1e6 / (now - when)
            busy = busy and (share >= self.BUSY or
                             bool(in_flight and before[pid][1]))
            quiet = quiet and share < self.QUIET and not in_flight
        self.busy[name] = self.busy.get(name, 0) + 1 if busy else 0
        self.quiet[name] = self.quiet.get(name, 0) + 1 if quiet else 0
        count = len(workers)
        least, most = subserver.settings.workers
        if self.busy[name] >= self.UP_SECONDS and count < most:
            self._decide(subserver, count + 1, 'every worker busy for %ds'
                         % self.busy[name])
        elif self.quiet[name] >= self.QUIET_SECONDS and count > least:
            self._decide(subserver, count - 1, 'no worker busy for %ds'
                         % self.quiet[name])

    def _decide(self, subserver, count, why):
        self.busy[subserver.name] = self.quiet[subserver.name] = 0
        decision = '%s: %d workers (%s)' % (why, count,
                                            subserver.settings.workers)
        self.decisions[subserver.name] = decision
        self.logger.info('[%s] %s', subserver.name, decision)
        self.scale(subserver, count)


# The control socket: the main process answers (_ControlChannel); brimd's
# commands and its workers ask (_ask and the functions after it).

def _control_address(pid):
    """The abstract Unix socket where brimd ``pid`` answers requests."""
    return '\0brimd-control-%d' % pid


def _peer_credentials(conn):
    """(pid, uid) of the process at the other end of Unix socket ``conn``."""
    pid, uid, _gid = struct.unpack('3i', conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i')))
    return pid, uid


class _ControlChannel(object):
    """The main process's control socket: one request a connection, a
    verb (the keys of VERBS), answered by its handler.

    Who may ask is stated once, in may_ask: ``retire`` only the main
    process's own workers (they may run as another user), every other
    verb only root or brimd's own user.  A request that is not allowed,
    and an unknown verb, get no answer: the connection just closes.
    """

    #: How long ``scale`` waits for the workers it started to serve.
    SCALE_SECONDS = 60.0

    def __init__(self, server):
        self.server = server
        self.sock = None
        self.answering = None   # the connection being answered
        self.scaling = []   # (connection, answer, workers started, deadline)

    def listen(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(_control_address(os.getpid()))
        self.sock.listen(64)

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        """Close the socket and every connection in hand: in the main
        process as it ends, and in each new worker, which must not keep an
        asker waiting on a connection it inherited."""
        for conn in [self.sock, self.answering] + [
                waiting[0] for waiting in self.scaling]:
            if conn is not None:
                conn.close()

    def answer(self):
        """Accept one request and answer it."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.answering = conn
        with conn:
            conn.settimeout(2.0)
            try:
                self.serve_request(conn)
            except OSError as err:
                self.server.logger.warning('control request failed: %s',
                                           err)
            except Exception:
                # A fault in answering must not end the main process.
                self.server.logger.exception('control request failed')
        self.answering = None

    def serve_request(self, conn):
        """Read the verb (and its words) on ``conn``; answer it if the
        asker may ask."""
        pid, uid = _peer_credentials(conn)
        words = conn.recv(256).split()
        verb, args = (words[0], words[1:]) if words else (b'', [])
        handler = self.VERBS.get(verb)
        if handler is not None and self.may_ask(verb, pid, uid):
            handler(self, conn, pid, [arg.decode('utf-8', 'replace')
                                      for arg in args])

    def may_ask(self, verb, pid, uid):
        """The one rule of who may ask what (see the class's doc)."""
        if verb == b'retire':
            return pid in self.server.supervisor.children
        return uid in (0, os.getuid())

    def _answer_ping(self, conn, pid, args):
        """``pong GENERATION``: brimd runs, restarted in place N times."""
        conn.sendall(b'pong %d' % self.server.generation)

    def _answer_status(self, conn, pid, args):
        conn.sendall(json.dumps(self.server.status()).encode('utf-8'))

    def _answer_addresses(self, conn, pid, args):
        """The keys of the sockets held: ``check`` counts them as free."""
        conn.sendall(json.dumps(sorted(
            _socket_key_of(s) for s in self.server.listening_sockets()
        )).encode('utf-8'))

    def _answer_restart(self, conn, pid, args):
        """Restart in place (a foreground brimd's ``restart``); the answer
        comes before the exec, which ends the connection."""
        restarter = self.server.restarter
        problem = restarter.check()
        conn.sendall(b'refused: %s' % problem.encode('utf-8')
                     if problem else b'restarting')
        if not problem:
            conn.close()
            restarter.exec_in_place()

    def _answer_sockets(self, conn, pid, args):
        """The listening sockets themselves, for a restarting brimd."""
        _send_sockets(conn, self.server.listening_sockets())
        self.server.keep_socket_files = True
        self.server.logger.info('handed the listening sockets to a new '
                                'brimd')

    def _answer_retire(self, conn, pid, args):
        """A worker asks to be replaced: max_requests, or a stuck
        request."""
        self.server.supervisor.replace(pid, 'asked to be replaced')

    def _answer_scale(self, conn, pid, args):
        """``scale SECTION COUNT`` (``*`` for every [wsgi], [tcp] and
        [udp]; COUNT N, +N or -N): answered once the workers it started
        serve (see answer_scaled)."""
        if len(args) != 2:
            conn.sendall(b'refused: scale takes a section and a count')
            return
        answer, started = self.server.scaler.scale(*args,
                                                   asked_by='scale command')
        self.scaling.append((conn.dup(), answer, started,
                             time.monotonic() + self.SCALE_SECONDS))
        self.answer_scaled()

    def due(self):
        """Seconds until the main loop should look at the scaling again."""
        return 0.01 if self.scaling else 1.0

    def answer_scaled(self):
        """Answer each ``scale`` whose new workers all serve now (or died
        trying, or took too long)."""
        for waiting in list(self.scaling):
            conn, answer, workers, deadline = waiting
            late = [w for w in workers if w.pid is not None and
                    w.wanted and not w.bucket.heartbeat()]
            failed = [w for w in workers if w.pid is None and w.wanted]
            if late and time.monotonic() < deadline:
                continue
            self.scaling.remove(waiting)
            if failed or late:
                answer += '; not serving: %s' % ', '.join(
                    w.label() for w in failed + late)
            with conn:
                try:
                    conn.sendall(answer.encode('utf-8'))
                except OSError:
                    pass

    VERBS = {b'ping': _answer_ping, b'status': _answer_status,
             b'addresses': _answer_addresses, b'restart': _answer_restart,
             b'sockets': _answer_sockets, b'retire': _answer_retire,
             b'scale': _answer_scale}


def _ask(pid, request, timeout=5.0):
    """Send ``request`` to brimd ``pid``'s control socket; its socket.

    Raises OSError when no brimd answers there: the pid is not a brimd.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(_control_address(pid))
        conn.sendall(request + b'\n')
    except OSError:
        conn.close()
        raise
    return conn


def _ping(pid):
    """The generation of brimd ``pid`` (restarts in place), or None when
    ``pid`` is not a running brimd (it does not answer on its socket)."""
    if not pid or not _pid_alive(pid):
        return None
    try:
        with _ask(pid, b'ping', 2.0) as conn:
            answer = conn.recv(64).split()
    except OSError:
        return None
    if len(answer) == 2 and answer[0] == b'pong' and answer[1].isdigit():
        return int(answer[1])
    return None


def _is_brimd(pid):
    return _ping(pid) is not None


def _ask_json(pid, request):
    """brimd ``pid``'s JSON answer to ``request``."""
    with _ask(pid, request) as conn:
        return json.loads(_read_all(conn).decode('utf-8'))


def _read_all(conn):
    """What ``conn`` sends until it closes."""
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


class _Restarter(object):
    """Restarts brimd in place (SIGUSR2, or ``restart`` of a foreground
    brimd): re-executes its command line in this same process, keeping
    the listening sockets and the process id (PID 1 in a container,
    systemd's main PID).  The new brimd drains this one's workers once its
    own serve.  The new configuration is checked first, in a subprocess; a
    bad one is refused and the old brimd goes on serving.

    ``command_line`` (a _CommandLine) is how this brimd was started; None
    (brim.serve(), say) refuses every restart.
    """

    def __init__(self, server, command_line=None):
        self.server = server
        self.command_line = command_line

    def restart(self):
        problem = self.check()
        if problem:
            self.server.logger.error('restart in place refused: %s', problem)
        else:
            self.exec_in_place()

    def check(self, app_traceback=False):
        """None when a restart in place may go ahead, else why not: the
        check's one line, or with ``app_traceback`` the traceback of an
        app's broken import (its files and lines) before it."""
        notifier = self.server.notifier
        notifier.send('RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=checking the '
                      'configuration' % _monotonic_usec())
        if self.command_line is None:
            problem = 'this brimd was not started from its command line'
        else:
            problem = _check_in_subprocess(
                self.command_line.argv('check'),
                [_socket_key_of(s) for s in self.server.listening_sockets()],
                app_traceback)
        if problem:
            reason = problem.splitlines()[-1]
            notifier.send('READY=1\nSTATUS=restart refused: %s' % reason)
            if not app_traceback:
                problem = reason
        return problem

    def reload(self, changed, become):
        """--reload: the file ``changed`` changed.  Check the code and the
        configuration in a subprocess, then ``become`` the new brimd
        (exec_in_place, or exec_anew for no-daemon).  A failed check is
        logged whole, once: the old code serves until the next change."""
        logger = self.server.logger
        logger.info('reloading: %s changed', changed)
        problem = self.check(app_traceback=True)
        if problem:
            logger.error('reload refused, the running code goes on serving '
                         'until the next change:\n%s', problem)
        else:
            become()

    def exec_in_place(self):
        """Become a new brimd (same pid) that inherits the listening
        sockets and drains this one's workers once its own serve."""
        server = self.server
        server.logger.info('restarting in place (generation %d)',
                           server.generation + 1)
        socks = server.listening_sockets()
        for sock in socks:
            sock.set_inheritable(True)
        os.environ[_INPLACE_ENV] = json.dumps({
            'generation': server.generation + 1,
            'start_time': server.start_time,
            'fds': [sock.fileno() for sock in socks],
            'workers': server.supervisor.pids(),
            'systemd_files': server.systemd_files,
            'scaled': {sub.name: server.scaler.target(sub)
                       for sub in server.subservers}})
        command = self.command_line.argv()
        # Until the new brimd has its handlers, SIGHUP or SIGUSR1 (say,
        # from logrotate) would end it: they wait, blocked, and the
        # blocked set survives exec.
        signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
        try:
            os.execv(command[0], command)   # handlers reset; sockets stay
        except OSError as err:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
            os.environ.pop(_INPLACE_ENV, None)
            for sock in socks:
                sock.set_inheritable(False)
            server.logger.error('restart in place failed: %s', err)

    def exec_anew(self):
        """no-daemon --reload: re-execute the command line (same pid).  The
        listening sockets close at exec and the new process binds them
        again (SO_REUSEADDR): one process, no workers to hand over to."""
        command = self.command_line.argv()
        _flush_logs()       # the serving threads batch this process's lines
        try:
            os.execv(command[0], command)
        except OSError as err:
            self.server.logger.error('reload failed: %s', err)


def _check_in_subprocess(command, held, app_traceback=False):
    """Run ``command``, a ``check``; None when it passes, else what it
    printed on standard error (its reason is the last line).  ``held``:
    socket keys this brimd holds (they need not be free);
    ``app_traceback``: have it print a broken import's traceback."""
    import subprocess
    env = dict(os.environ)
    env[_HELD_ENV] = json.dumps(held)
    if app_traceback:
        env[_APP_TRACEBACK_ENV] = '1'
    try:
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return 'could not run check: %s' % err
    if done.returncode == 0:
        return None
    printed = done.stderr.decode('utf-8', 'replace').rstrip()
    return printed or 'check exited %d' % done.returncode


# -- --reload: restart on code change, for development ----------------------
#
# The main loop wakes at least once a second anyway; _Reloader stats the
# watched files then.  A stat is a couple of microseconds, so even a
# project of thousands of files costs a fraction of a percent of a core,
# with no thread and nothing outside the standard library.

#: Seconds between looks at the watched files.
_RELOAD_POLL = 1.0


class _Reloader(object):
    """Notices a change to any of ``paths``: a new mtime, size or inode (an
    editor that saves by replacing the file), a file gone, or one that was
    missing and appeared."""

    def __init__(self, paths):
        self.paths = sorted(set(paths))
        self.stamps = {path: self._stamp(path) for path in self.paths}
        self.next_look = time.monotonic() + _RELOAD_POLL

    @staticmethod
    def _stamp(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self):
        """A file that changed since the last look, else None; each change
        is told once (a save that touches several files, once in all).
        Looks at most once every _RELOAD_POLL seconds."""
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + _RELOAD_POLL
        found = None
        for path in self.paths:
            stamp = self._stamp(path)
            if stamp != self.stamps[path]:
                self.stamps[path] = stamp
                found = found or path
        return found


def _watched_files(conf, extra_files):
    """What --reload watches: the source of every module loaded so far
    (the calls' and whatever they imported) outside the standard library
    and installed packages, every configuration file read, and
    ``extra_files`` (glob patterns; a missing file is watched to appear)."""
    libraries = _library_places()
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, '__file__', None)
        if isinstance(path, str) and not _in_library(path, libraries):
            files.add(path)
    for pattern in extra_files:
        files.update(glob.glob(pattern, recursive=True) or [pattern])
    files.update(conf.files)
    return sorted(os.path.abspath(path) for path in files)


def _library_places():
    """The directories of the standard library and installed packages (of
    this environment and of the Python it was made from), each ending in
    a separator.  Not sys.prefix itself: a project may live under
    /usr/local or /opt beside its Python."""
    places = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        paths = sysconfig.get_paths(vars={
            'base': prefix, 'platbase': prefix, 'installed_base': prefix,
            'installed_platbase': prefix})
        places.update(paths[name] for name in
                      ('stdlib', 'platstdlib', 'purelib', 'platlib'))
    return tuple(os.path.join(os.path.abspath(place), '')
                 for place in places)


def _in_library(path, libraries):
    """Whether ``path`` is the standard library's or an installed
    package's: under ``libraries``, or in any site-packages or
    dist-packages (the user's, Debian's /usr/lib/python3/dist-packages)."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    return (path.startswith(libraries) or 'site-packages' in parts or
            'dist-packages' in parts)


class _Forker(object):
    """Forks the workers' processes and, in each child, makes the worker:
    its signal handlers, only its own descriptors, its log, the user it
    runs as; then it serves until it exits."""

    def __init__(self, server):
        self.server = server

    def fork(self, worker, ready_fd):
        """Fork the process of ``worker``; its pid in the main process."""
        # Signals wait until the child has its own handlers: a SIGTERM
        # caught by the main process's no-op handler would be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._run_child(worker, ready_fd)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
        return pid

    def _run_child(self, worker, ready_fd):
        """In the new child: become worker ``worker`` and never return."""
        code = 1
        subserver = worker.subserver
        try:
            self._child_signals(subserver)
            self._close_main_fds(subserver, ready_fd)
            subserver.open_log(self.server.to_stderr)
            subserver.open_wakeups()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
            self._drop_privileges()
            subserver.start_worker(worker.index, worker.bucket)
            worker.bucket.beat()
            if ready_fd is not None:
                os.close(ready_fd)
                ready_fd = None
            subserver.serve_forever()
            code = 0
        except BaseException as err:
            if isinstance(err, SystemExit) and not err.code:
                code = 0
            else:
                logger = subserver.logger or self.server.logger
                logger.error('%s failed: %s\n%s', worker.label(),
                             _one_line(err), traceback.format_exc())
                if ready_fd is not None:
                    _write_line(ready_fd, '%s failed to start: %s' %
                                (worker.label(), _one_line(err)))
        finally:
            _flush_logs()
            os._exit(code)

    @staticmethod
    def _child_signals(subserver):
        """A worker's own handlers, for the signals fork held back (they
        reach it once it can drain)."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGQUIT,
                       signal.SIGUSR2, signal.SIGABRT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda *_: subserver.note_reopen())
        if subserver.kind == 'daemons':
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        else:
            signal.signal(signal.SIGHUP, lambda *_: subserver.drain())

    def _close_main_fds(self, keep, ready_fd):
        """A child needs its own listening socket and ready pipe only."""
        server = self.server
        server.control.close()
        if server.statsd is not None:
            server.statsd.close()
        for fd in list(server.wake_fds) + list(server.supervisor.replacing):
            if fd != ready_fd:
                os.close(fd)
        for subserver in server.subservers:
            if subserver is not keep and isinstance(subserver, _IPSubserver):
                subserver.sock.close()

    def _drop_privileges(self):
        server = self.server
        if server.uid is not None and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(server.gid)
            os.setuid(server.uid)
        os.umask(server.settings.umask)


class Server(object):
    """brimd's main process: owns the listening sockets, forks the
    workers, runs the main loop and stops.

    Its parts: a _Supervisor keeps a worker in every wanted slot (a
    _Forker makes each), a _Scaler and an _Autoscaler say how many are
    wanted, a _ControlChannel answers the control socket (its verbs:
    _ControlChannel.VERBS), a _Restarter restarts brimd in place.  Signal
    handlers do nothing (``signal.set_wakeup_fd`` writes the signal's
    number to a pipe); the main loop reads the numbers and calls one
    ``_on_SIGNAME`` method per signal.
    """

    def __init__(self, conf, to_stderr=False):
        self.conf = conf
        self.settings = _read_settings(conf, 'brim', 'brim')
        self.to_stderr = to_stderr
        self.subservers = []
        self.start_time = int(time.time())
        self.forked = False
        self.foreground = False
        self.slots = []         # a _WorkerSlot for every worker and daemon
        self.supervisor = None  # made by run(), once the workers are known
        self.statsd_address = None  # (family, address) with statsd_host
        self.statsd = None      # the main process's _Statsd, made by run()
        self.control = _ControlChannel(self)
        self.restarter = _Restarter(self)
        self.scaler = _Scaler(self)
        self.reloader = None    # a _Reloader under --reload
        self.pid_file = None
        self.generation = 0     # restarts in place so far
        #: When shutdown_delay ends (time.monotonic()), while it runs.
        self.shutdown_at = None
        self.notifier = _Notifier()
        # Unix socket files stay when brimd ends if another brimd listens
        # on them now (handed over, or a failed start of one that took
        # them over), or if systemd made them (it still listens).
        self.took_sockets = False
        self.keep_socket_files = False
        self.systemd_files = False
        #: Where a daemonized brimd logs when there is no syslog socket.
        self.fallback_log_file = None

    # -- configuration (main process, before forking) -----------------------

    def configure(self):
        """Read the subservers' sections, the user to run as, open the
        log, lay out the stats (main process, before forking)."""
        self.subservers = _configure_subservers(self, self.conf)
        self.user, self.uid, self.gid = _user_to_run_as(self.settings)
        settings = self.settings
        self.logger = get_logger(
            settings.log_name, settings.log_level, settings.log_facility,
            settings.log_file or self.fallback_log_file, self.to_stderr,
            settings.log_format)
        self.notifier.logger = self.logger
        self.statsd_address = _statsd_address(settings)
        self.stats_layout = _StatsLayout(self.subservers)
        for subserver in self.subservers:
            self.slots += [_WorkerSlot(subserver, index,
                                       self.stats_layout.bucket(subserver,
                                                                index))
                           for index in range(subserver.bucket_count)]
            _want(self.slots, subserver, subserver.starting_workers)

    def bind(self, inherited=None):
        """Bind every listening socket (or take over an old brimd's)."""
        inherited = dict(inherited or {})
        self.took_sockets = bool(inherited)
        for subserver in self.subservers:
            if isinstance(subserver, _IPSubserver):
                subserver.bind(inherited)
        for key, sock in inherited.items():
            self.logger.warning('inherited listening socket %s matches no '
                                'subserver in the configuration; closing '
                                'it', key)
            sock.close()

    def listening_sockets(self):
        return [s.sock for s in self.subservers
                if isinstance(s, _IPSubserver) and s.sock is not None]

    # -- running -------------------------------------------------------------

    def run(self, ready_fd=None, pid_file=None, old_workers=()):
        """Fork the workers, report readiness, supervise until told to end.

        ``old_workers`` are the previous generation's processes after a
        restart in place: they are drained once the new workers serve.
        """
        self.forked = True
        self.pid_file = pid_file
        self.statsd = _open_statsd(self)
        self.supervisor = _Supervisor(self.slots, self.logger,
                                      self.settings.graceful_timeout,
                                      _Forker(self).fork,
                                      on_restart=self._count_restart)
        self.autoscaler = _Autoscaler(self.scaler.scale_to, self.logger)
        self.wake_fds = _wake_on_signals()
        self.supervisor.adopt(old_workers)
        _prepare_to_fork()
        for worker in self.supervisor.wanted():
            self.supervisor.spawn(worker, ready_fd)
        failure = self._wait_ready()
        if failure:
            return self._start_failed(failure, ready_fd)
        self.supervisor.drain_retired()
        # Listening only now: a ``ping`` answer means the workers serve.
        self.control.listen()
        self._report_ready(ready_fd)
        return self._main_loop()

    def _start_failed(self, failure, ready_fd):
        self.logger.error('brimd could not start: %s', failure)
        if self.reloader and self.supervisor.retired:
            return self._serve_on_with_previous_workers()
        if self.took_sockets:
            self.keep_socket_files = True
        if ready_fd is not None:
            _write_line(ready_fd, failure)
        # Drain, not stop: during a restart the workers that did start
        # have taken connections from the shared sockets already.
        self.shutdown()
        return 1

    def _serve_on_with_previous_workers(self):
        """--reload: this code's workers failed to start (an app factory
        that raises, say).  Stop them, and let the previous code's workers
        serve on until the next change, as a check that fails does."""
        self.supervisor.stopping = True     # no restarts of the failed ones
        for pid in self.supervisor.children:
            _kill(pid, signal.SIGTERM)
        self.logger.error('reload failed, the previous workers go on '
                          'serving until the next change')
        self.control.listen()
        return self._main_loop()

    def _report_ready(self, ready_fd):
        """Tell the pid file, the log, systemd and ``start`` that brimd
        serves."""
        if self.pid_file:
            _write_pid_file(self.pid_file, os.getpid())
        self.logger.info('brimd %s serving %s (pid %d)', __version__,
                         _serving(self.subservers), os.getpid())
        self.notifier.send('READY=1\nMAINPID=%d\nSTATUS=serving %s'
                           % (os.getpid(), _serving(self.subservers)))
        if ready_fd is not None:
            _write_line(ready_fd, 'ready %d' % os.getpid())
            os.close(ready_fd)

    def _wait_ready(self, timeout=60.0):
        """None once every worker has beaten once, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failure = self.supervisor.starting_failure()
            if failure or self.supervisor.all_started():
                return failure
            time.sleep(0.01)
        return 'workers did not start within %ds.' % timeout

    def _main_loop(self):
        """Wait for signals, control requests and ready pipes; tend the
        workers at least once a second."""
        while True:
            timeout = max(0.0, min(1.0, self.supervisor.next_due(),
                                   self.notifier.watchdog_due(),
                                   self._delay_left(), self.control.due()))
            for signum in self._wait(timeout):
                handler = getattr(self, '_on_' + _signal_name(signum), None)
                code = handler() if handler else None
                if code is not None:
                    return code
            if self._delay_left() <= 0:
                return self.shutdown()
            self.supervisor.tend()
            self.autoscaler.tend(self.subservers, self.supervisor.wanted())
            self.control.answer_scaled()
            self.notifier.watchdog()
            self._tell_statsd()
            changed = self.reloader and self.reloader.changed()
            if changed:
                self.restarter.reload(changed, self.restarter.exec_in_place)

    def _count_restart(self, worker):
        """The supervisor's on_restart: a restart is a statsd counter."""
        if self.statsd is not None:
            self.statsd.count('workers.restarts')

    def _tell_statsd(self):
        """About once a second: how many workers and daemons run, and the
        main process's lines since."""
        if self.statsd is not None and self.statsd.due():
            self.statsd.gauge('workers', len(self.supervisor.children))
            self.statsd.flush()

    def _delay_left(self):
        """Seconds left of shutdown_delay (inf when none runs)."""
        if self.shutdown_at is None:
            return float('inf')
        return self.shutdown_at - time.monotonic()

    def _wait(self, timeout):
        """Wait up to ``timeout`` seconds; answer control requests and
        ready pipes; the numbers of the signals that came."""
        wake_r = self.wake_fds[0]
        try:
            readable = select.select(
                [wake_r, self.control] + list(self.supervisor.replacing),
                [], [], timeout)[0]
        except InterruptedError:
            readable = []
        signums = b''
        for ready in readable:
            if ready is wake_r:
                try:
                    signums = os.read(wake_r, 512)
                except BlockingIOError:
                    pass
            elif ready is self.control:
                self.control.answer()
            else:
                self.supervisor.replacement_ready(ready)
        return signums

    # One method per signal.  Those that end brimd return its exit status.

    def _on_SIGTERM(self):
        # Container runtimes and systemd stop with SIGTERM and expect a
        # graceful exit; a daemonized brimd keeps brimd's meaning: stop.
        return self.shut_down_later() if self.foreground else self.stop()

    def _on_SIGINT(self):
        return self.stop()

    _on_SIGQUIT = _on_SIGINT

    def _on_SIGHUP(self):
        return self.shut_down_later()

    def _on_SIGUSR1(self):
        """Reopen log files (after logrotate moved them), here and in
        every worker."""
        _reopen_logs()
        self.logger.info('reopened the log files')
        self.supervisor.signal_all(signal.SIGUSR1)

    def _on_SIGUSR2(self):
        self.restarter.restart()

    def _on_SIGTTIN(self):
        """One more worker for every [wsgi], [tcp] and [udp] (gunicorn's
        signal)."""
        self.scaler.scale('*', '+1', 'SIGTTIN')

    def _on_SIGTTOU(self):
        """One worker fewer for each (never below one)."""
        self.scaler.scale('*', '-1', 'SIGTTOU')

    def status(self):
        """What ``brimd status`` (and ``top``) shows (see _status_report)."""
        return _status_report(self)

    # -- the end -------------------------------------------------------------

    def stop(self):
        """Immediate: workers get SIGTERM (then SIGKILL), brimd exits."""
        self.supervisor.stopping = True
        self.logger.info('brimd stopping')
        self.notifier.send('STOPPING=1')
        self._remove_socket_files()
        self.supervisor.signal_all(signal.SIGTERM)
        self.supervisor.wait_all(5.0)
        return self._exit()

    def shut_down_later(self):
        """Graceful, after shutdown_delay: report not ready at once but
        go on serving, so load balancers and Kubernetes stop sending
        before the ports close.  Asked again meanwhile: shut down now."""
        delay = self.settings.shutdown_delay
        if delay <= 0 or self.shutdown_at is not None:
            return self.shutdown()
        self.shutdown_at = time.monotonic() + delay
        self.stats_layout.set_not_ready()
        self.logger.info('brimd not ready; shutting down gracefully in '
                         '%gs (shutdown_delay)', delay)
        self.notifier.send('STATUS=not ready, shutting down in %gs' % delay)
        return None

    def shutdown(self):
        """Graceful: release the ports now, let workers finish, then exit."""
        self.supervisor.stopping = True
        self.logger.info('brimd shutting down gracefully')
        self.notifier.send('STOPPING=1')
        for sock in self.listening_sockets():
            sock.close()
        self._remove_socket_files()
        self.supervisor.signal_all(signal.SIGHUP)
        self.supervisor.wait_all(self.settings.graceful_timeout + 1.0)
        return self._exit()

    def _remove_socket_files(self):
        if self.keep_socket_files:
            return
        for subserver in self.subservers:
            if isinstance(subserver, _IPSubserver):
                subserver.remove_socket_file()

    def _exit(self):
        if self.pid_file and _read_pid_file(self.pid_file) == os.getpid():
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass
        self.logger.info('brimd exited')
        return 0


def _status_report(server):
    """``server``'s status: every worker of every subserver, and those
    draining."""
    now = time.time()
    reading = server.stats_layout.read(server.start_time)
    subservers = []
    for subserver in server.subservers:
        read = {worker.label: worker for worker in
                reading.subservers[subserver.name].workers}
        workers = [_slot_status(worker, read, now)
                   for worker in server.supervisor.wanted()
                   if worker.subserver is subserver]
        workers += [_draining_status(pid, worker, read, now)
                    for pid, worker in server.supervisor.draining.items()
                    if worker.subserver is subserver]
        subservers.append({
            'name': subserver.name, 'kind': subserver.kind,
            'addresses': subserver.addresses(),
            'configured': str(subserver.settings.workers),
            'target': server.scaler.target(subserver),
            'max_workers': subserver.bucket_count,
            'decision': server.autoscaler.decisions.get(subserver.name),
            'workers': workers})
    return {'pid': os.getpid(), 'uptime': round(now - server.start_time),
            'generation': server.generation,
            'foreground': server.foreground, 'subservers': subservers}


def _slot_status(worker, read, now):
    """``worker``'s status; ``read``: _WorkerStats by label."""
    status = _process_status(worker.pid, worker, read, now)
    if worker.pid is None:
        status['state'] = 'down'
    elif not worker.bucket.heartbeat():
        status['state'] = 'starting'
    status.update(uptime=(round(now - worker.started_at, 1)
                          if worker.pid else None),
                  last_exit=worker.last_exit)
    return status


def _draining_status(pid, worker, read, now):
    """The status of process ``pid``, draining from ``worker``'s slot."""
    status = _process_status(pid, worker, read, now)
    status.update(state='draining', uptime=None, last_exit=None)
    return status


def _process_status(pid, worker, read, now):
    """What status shows of process ``pid`` in slot ``worker``: its
    bucket's stats (``read``: _WorkerStats by label), the request in
    flight, and what the kernel says of its memory and CPU time."""
    label = worker.subserver.bucket_labels()[worker.index]
    stats = read.get(label)
    in_flight = stats.in_flight if stats else 0
    started, latest = worker.bucket.latest_request()
    rss, cpu = _proc_usage(pid) if pid else (None, None)
    return {'label': label,
            'pid': pid, 'state': 'busy' if in_flight else 'idle',
            'served': stats.served if stats else 0,
            'restarts': worker.restarts, 'in_flight': in_flight,
            'busy_seconds': round(stats.busy_usec / 1e6, 3) if stats else 0,
            'request': latest if in_flight else None,
            'request_seconds': (round(max(0.0, now - started), 3)
                                if in_flight and started else None),
            'rss_bytes': rss, 'cpu_seconds': cpu}


def _proc_usage(pid):
    """(resident bytes, CPU seconds) of ``pid``, from /proc; (None, None)
    where there is none."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as fp:
            fields = fp.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None, None
    # After the name: state is field 3 of proc(5), so field N is [N - 3].
    return (int(fields[21]) * _PAGE_SIZE,
            round((int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, 2))


_PAGE_SIZE = os.sysconf('SC_PAGE_SIZE')
_CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def _scaled_count(subserver, now, count):
    """The worker count ``count`` ('N', '+N' or '-N') asks of
    ``subserver``, which runs ``now``; ValueError if it may not."""
    try:
        wanted = int(count)
    except ValueError:
        raise ValueError('%r is not a worker count; give N, +N or -N'
                         % count)
    if count[:1] in '+-':
        wanted = max(1, now + wanted)
    if not 1 <= wanted <= subserver.bucket_count:
        raise ValueError('[%s] may run 1 to %d workers (max_workers), not '
                         '%d' % (subserver.name, subserver.bucket_count,
                                 wanted))
    return wanted


def _run_inline(server):
    """no-daemon: serve every subserver from threads of this process
    (debugging), until a signal to end."""
    import copy
    wake_r, _ = _wake_on_signals()
    for worker in [w for w in server.slots if w.wanted]:
        subserver = copy.copy(worker.subserver)
        subserver.open_log(True)
        subserver.open_wakeups()
        subserver.start_worker(worker.index, server.stats_layout.bucket(
            worker.subserver, worker.index))
        threading.Thread(target=subserver.serve_forever, daemon=True).start()
    server.logger.info('brimd %s serving %s in one process (pid %d)',
                       __version__, _serving(server.subservers), os.getpid())
    timeout = _RELOAD_POLL if server.reloader else None
    while True:
        select.select([wake_r], [], [], timeout)
        changed = server.reloader and server.reloader.changed()
        if changed:
            server.restarter.reload(changed, server.restarter.exec_anew)
        try:
            signums = os.read(wake_r, 512)
        except BlockingIOError:
            continue
        if any(s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                     signal.SIGHUP) for s in signums):
            server.logger.info('brimd exited')
            return 0


def _serving(subservers):
    """What brimd serves, for its log and systemd's status line."""
    return ', '.join('[%s] %s' % (s.name, ' '.join(s.addresses()) or
                                  '%d daemons' % s.bucket_count)
                     for s in subservers)


def _wake_on_signals():
    """Have every signal the main process handles write its number to a
    new pipe, which wakes the main loop; the pipe (read end, write end).

    The handler itself does nothing: one that acted could run in the
    middle of anything the main loop does.
    """
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                   signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, _note_signal)
    # Blocked by a brimd that restarted in place (see _Restarter).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
    return wake_r, wake_w


#: What the main process handles and a new child must not miss.
_CHILD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                  signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


def _prepare_to_fork():
    """Make the memory every worker starts with small and shared.

    Compiling brim.py and the apps leaves megabytes of freed heap mapped;
    malloc_trim hands it back to the kernel (glibc), so no worker carries
    it.  gc.freeze keeps the collector from touching (and so copying) the
    objects the workers inherit.
    """
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _note_signal(signum, frame):
    """Signal handler: nothing; the wakeup fd already carries the number."""


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _monotonic_usec():
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000)


class _Notifier(object):
    """systemd's notify protocol: datagrams to ``$NOTIFY_SOCKET``.

    READY=1, RELOADING=1, STOPPING=1 and STATUS= tell systemd (with
    ``Type=notify``) where brimd is; with ``WatchdogSec=`` the main loop
    sends WATCHDOG=1 at half the interval while it runs.  A socket that
    cannot be reached is logged once and then left alone.
    """

    def __init__(self):
        self.address = os.environ.get('NOTIFY_SOCKET') or None
        if self.address and self.address[0] == '@':
            self.address = '\0' + self.address[1:]     # abstract namespace
        self.interval = None
        usec = os.environ.get('WATCHDOG_USEC', '')
        watchdog_pid = os.environ.get('WATCHDOG_PID', '')
        if (usec.isdigit() and int(usec) and
                watchdog_pid in ('', str(os.getpid()))):
            self.interval = int(usec) / 2e6
        self.next_watchdog = time.monotonic()
        self.logger = None

    def send(self, state):
        if not self.address:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.sendto(state.encode('utf-8'), self.address)
        except OSError as err:
            if self.logger:
                self.logger.warning('NOTIFY_SOCKET %s cannot be reached (%s);'
                                    ' not notifying systemd',
                                    os.environ.get('NOTIFY_SOCKET'), err)
            self.address = None
        finally:
            sock.close()

    def watchdog_due(self):
        if self.interval is None or not self.address:
            return 1.0
        return self.next_watchdog - time.monotonic()

    def watchdog(self):
        if (self.interval is not None and
                time.monotonic() >= self.next_watchdog):
            self.next_watchdog = time.monotonic() + self.interval
            self.send('WATCHDOG=1')


def _write_line(fd, text):
    try:
        os.write(fd, (text.replace('\n', ' ') + '\n').encode('utf-8'))
    except OSError:
        pass


def _write_pid_file(path, pid):
    tmp = '%s.%d.tmp' % (path, pid)
    with open(tmp, 'w') as fp:
        fp.write('%d\n' % pid)
    os.rename(tmp, path)


def _read_pid_file(path):
    """The pid in ``path``, or None when there is no usable one."""
    try:
        with open(path) as fp:
            return int(fp.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_USAGE = '''%(prog)s [options] [command]

brimd: a pre-fork server launcher.

commands (default: no-daemon):
  serve APP     serve the WSGI app APP (package.module:app, or
                package.module:factory() called in each worker; a bare
                package.module means package.module:application) in the
                foreground on 127.0.0.1:8000 with 2 workers, logging to
                standard error; Ctrl-C stops, SIGTERM drains.  No
                configuration is needed; with -c, APP goes last in
                [wsgi]'s apps
  start         start brimd in the background; returns once it serves
                (exit 0 too when it is already running)
  stop          stop brimd at once, cutting off requests in flight
  shutdown      release the ports at once; workers finish what they are
                serving, then exit
  restart       start a new brimd that takes over the running one's
                listening sockets, then shut the old one down gracefully
  reload        the same as restart
  force-reload  the same as restart
  status        say whether brimd is running (exit 0 running, 1 dead with
                a stale pid file, 3 not running), then its workers
  scale [SECTION] N
                run N workers (or +N, -N more or fewer) in [SECTION], or
                in every [wsgi], [tcp] and [udp] with a fixed count;
                returns once new workers serve; removed ones drain
  check [APP]   check the configuration without serving: every option,
                call, certificate, user and address; exit 0 when it is OK
                (with APP, what serve APP would run)
  foreground    what start runs, attached to the terminal (containers,
                supervisors): logs to standard error, SIGTERM drains like
                shutdown, SIGUSR2 restarts in place keeping the process id;
                with --reload, so does a change to a source file (for
                development; no-daemon --reload re-executes itself)
  no-daemon     serve in the foreground in one process, logging to the
                terminal, with no pid file: for debugging
  hash-password [NAME]
                read a password (without echo; or a line from standard
                input when it is not a terminal) and print "NAME hash",
                a line for a WSGIBasicAuth auth_path file; without NAME,
                just the hash
  top           a live view of the running brimd: each worker's state,
                request in flight, requests a second, CPU and memory,
                redrawn every second (s changes the sort, q quits); one
                snapshot when standard output is not a terminal, or as
                JSON with --json
'''

#: Where ``serve`` listens, and with how many workers, unless the command
#: line or the configuration says otherwise.
_SERVE_DEFAULTS = {'ip': '127.0.0.1', 'port': '8000', 'workers': '2'}

#: Set by a brimd that re-executes itself (SIGUSR2): what the new image
#: takes over.
_INPLACE_ENV = 'BRIM_RESTART_IN_PLACE'
#: Set for the ``check`` a restart in place runs: the addresses that
#: brimd holds, which count as available.
_HELD_ENV = 'BRIM_CHECK_HELD'
#: Set for the ``check`` a --reload runs: print the traceback of an app
#: that fails to import (see _app_traceback).
_APP_TRACEBACK_ENV = 'BRIM_CHECK_APP_TRACEBACK'


def _parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog='brimd', usage=_USAGE, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-h', '-?', '--help', action='store_true',
                        help='show this help and exit')
    parser.add_argument('-c', '--conf', action='append', metavar='PATH',
                        help='read this configuration file instead of '
                             '/etc/brimd.conf and ~/.brimd.conf; repeat to '
                             'read several, in order')
    parser.add_argument('-p', '--pid-file', metavar='PATH',
                        help='where the main process id is kept (- for '
                             'none); default [brim] pid_file, else '
                             '/var/run/brimd.pid when writable, else '
                             '~/.brimd.pid')
    parser.add_argument('-o', '--output', action='store_true',
                        help='keep standard output and error open and log '
                             'to standard error')
    parser.add_argument('-v', '--version', action='store_true',
                        help='show the version and exit')
    parser.add_argument('-x', '--error-stack-trace', action='store_true',
                        help='show a full traceback for a start-up error')
    _add_command_flags(parser)
    parser.add_argument('command', nargs='?', default='no-daemon',
                        help=argparse.SUPPRESS)
    parser.add_argument('name', nargs='?', help=argparse.SUPPRESS)
    parser.add_argument('count', nargs='?', help=argparse.SUPPRESS)
    # Intermixed: options may come between the command and its argument
    # (serve --port 8080 myapp:app).
    args = parser.parse_intermixed_args(argv)
    args.app = args.name if args.command in ('serve', 'check') else None
    return parser, args


def _add_command_flags(parser):
    """The options only some commands take (_misuse says which)."""
    parser.add_argument('--ip', metavar='ADDRESS',
                        help='serve: the address to listen on; default '
                             '[wsgi] ip, else 127.0.0.1')
    parser.add_argument('--port', type=int, metavar='PORT',
                        help='serve: the port to listen on; default [wsgi] '
                             'port, else 8000')
    parser.add_argument('--workers', type=int, metavar='N',
                        help='serve: how many worker processes; default '
                             '[wsgi] workers, else 2')
    parser.add_argument('--reload', action='store_true',
                        help='restart when a file changes (development)')
    parser.add_argument('--json', action='store_true',
                        help='top: print one snapshot as JSON and exit')


class _CommandLine(object):
    """How this brimd was started: its script and parsed arguments; what
    a restart in place runs again."""

    def __init__(self, script, args):
        self.script = script
        self.args = args

    def argv(self, command=None):
        """The argv that runs brimd ``command`` (default: the one this
        process runs, --reload included) with this process's options (and
        the app that ``serve`` serves)."""
        args = self.args
        argv = [sys.executable, self.script]
        for path in args.conf or ():
            argv += ['-c', path]
        if args.pid_file:
            argv += ['-p', args.pid_file]
        if args.output:
            argv.append('-o')
        for flag in ('ip', 'port', 'workers'):
            if getattr(args, flag) is not None:
                argv += ['--' + flag, str(getattr(args, flag))]
        if command is None and args.reload:
            argv.append('--reload')
        return (argv + [command or args.command] +
                ([args.app] if args.app else []))


class _StartPlan(collections.namedtuple('_StartPlan', (
        'origin', 'sockets', 'pid_file', 'foreground', 'keep_output',
        'generation', 'start_time', 'old_workers', 'systemd_files',
        'scaled'), defaults=(False, None))):
    """How a main process starts, decided once, before it binds.

    ``origin``: where its listening sockets come from: ``bind`` (all bound
    anew), ``systemd`` (socket activation), ``handover`` (from the brimd
    that ``restart`` replaces) or ``in place`` (this process's previous
    image, after a restart in place); ``sockets``: those taken over,
    {key: socket}, which binding uses first.  ``pid_file``: where the
    main pid is kept, or None.  ``foreground``: serve attached (SIGTERM
    drains) rather than as a daemon; ``keep_output``: a daemon keeps
    standard output and error (-o) instead of sending them to its log.
    After a restart in place the generation and start time carry on and
    ``old_workers`` drain once the new ones serve, and each subserver
    runs as many workers as it ran (``scaled``: {section: count}).
    ``systemd_files``: the Unix socket files are systemd's (it passed the
    sockets, to this brimd or to the image before a restart in place):
    stop leaves them.
    """

    @property
    def detach(self):
        """Fork into the background: a daemon's first start (one that
        restarted in place is in the background already)."""
        return not self.foreground and self.origin != 'in place'


def _in_place_plan(foreground, keep_output):
    """The plan of a brimd that a restart in place (SIGUSR2) started, from
    what its previous image passed on; None for a fresh start."""
    raw = os.environ.pop(_INPLACE_ENV, None)
    if not raw:
        return None
    state = json.loads(raw)
    return _StartPlan('in place', _sockets_from_fds(state['fds']), None,
                      foreground, keep_output, state['generation'],
                      state['start_time'], tuple(state['workers']),
                      state.get('systemd_files', False),
                      state.get('scaled'))


def _fresh_plan(pid_file, foreground, keep_output, handed_over=None):
    """A fresh start's plan: the sockets an old brimd handed over, else
    those systemd passed, else none."""
    if handed_over:
        origin, sockets = 'handover', handed_over
    else:
        sockets = _systemd_sockets()
        origin = 'systemd' if sockets else 'bind'
    return _StartPlan(origin, sockets, pid_file, foreground, keep_output,
                      0, None, (), origin == 'systemd')


def _pid_file_path(args, configured):
    """The pid file to use (-p, else ``configured``, [brim] pid_file), or
    None for ``-p -``."""
    path = args.pid_file
    if path is None:
        path = configured
    if path is None:
        path = '/var/run/brimd.pid'
        if not os.access(os.path.dirname(path), os.W_OK):
            path = os.path.expanduser('~/.brimd.pid')
    if path == '-':
        return None
    return os.path.abspath(os.path.expanduser(path))


def _load_server(args, to_stderr, daemon=False):
    """A Server with its configuration read and every app's conf parsed.

    A daemon has no terminal: without a syslog socket or a log_file its
    logs would vanish, so they go to a file beside the pid file and
    ``start`` says where.  Each log file is opened once here first: one
    that cannot be opened stops the start with a line that names what to
    change, where the open itself would give a bare errno.
    """
    server = Server(_conf_of(args), to_stderr)
    settings = server.settings
    _put_on_sys_path(settings.pythonpath)
    fallback_why = None
    if daemon:
        pid_file = _pid_file_path(args, settings.pid_file)
        if pid_file:
            _check_pid_file_writable(pid_file)
        if not to_stderr and not _syslog_socket():
            server.fallback_log_file, fallback_why = _fallback_log_file(
                pid_file)
    if settings.log_file:
        _check_log_file(settings.log_file, 'change [brim] log_file')
    elif fallback_why:
        _check_log_file(server.fallback_log_file, fallback_why)
    server.configure()
    for subserver in server.subservers:
        own = subserver.settings.log_file
        if own and own != settings.log_file:
            _check_log_file(own, 'change [%s] log_file' % subserver.name)
    return server


def _conf_of(args):
    """The configuration the command line names.  ``serve APP`` needs none:
    with -c, APP goes last in that configuration's [wsgi] apps."""
    if not args.app:
        return read_conf(args.conf or DEFAULT_CONF_FILES,
                         explicit=bool(args.conf))
    conf = read_conf(args.conf, explicit=True) if args.conf else Conf({})
    if 'serve' in conf.store:
        raise ConfError('%s has a [serve] section, the name serve gives '
                        'its app; rename that section.'
                        % ', '.join(conf.files))
    spec = args.app if ':' in args.app else args.app + ':application'
    conf.store['serve'] = {'call': spec}
    wsgi = conf.store.setdefault('wsgi', {})
    wsgi['apps'] = ' '.join(wsgi.get('apps', '').split() + ['serve'])
    for option, default in _SERVE_DEFAULTS.items():
        flag = getattr(args, option)
        if flag is not None:
            wsgi[option] = str(flag)
        elif _setting(conf, 'wsgi', _OPTION[option])[1] is None:
            wsgi[option] = default      # neither [wsgi] nor [brim] sets it
    return conf


def _fallback_log_file(pid_file):
    """(path, why there) of the log a daemon writes with neither log_file
    nor a syslog socket: beside its pid file, or ~/.brimd.log without one."""
    if pid_file:
        return (os.path.splitext(pid_file)[0] + '.log',
                'a daemon with no syslog socket (/dev/log) and no [brim] '
                'log_file logs beside its pid file; set log_file, or move '
                'the pid file with -p or [brim] pid_file')
    return (os.path.expanduser('~/.brimd.log'),
            'a daemon with no syslog socket (/dev/log), no [brim] log_file '
            'and no pid file (-p -) logs to ~/.brimd.log; set log_file')


def _check_log_file(path, what_to_change):
    """Open ``path`` as a log file is opened (appending, creating it;
    a FIFO nobody reads fails at once, as it would later)."""
    try:
        os.close(os.open(path, _AppendHandler.FLAGS, 0o644))
    except OSError as err:
        raise ConfError('Cannot open the log file %s (%s); %s.'
                        % (path, err.strerror or err, what_to_change))


def _launch(server, plan):
    """Start ``server`` as ``plan`` says and serve until the end; the exit
    status (for a daemon's first start: whether it serves)."""
    server.systemd_files = plan.systemd_files
    if plan.systemd_files:
        server.keep_socket_files = True
    if plan.foreground:
        server.foreground = True
        _become_subreaper()
        return _serve_plan(server, plan)
    if plan.detach:
        # Bound before the fork: a port that stays busy is start's error.
        server.bind(plan.sockets)
        return _daemonize(server, plan)
    return _run_daemon(server, plan)


def _serve_plan(server, plan, ready_fd=None):
    """The main process: bind (unless it did before it detached), then
    fork the workers and supervise them."""
    if plan.origin == 'in place':
        server.generation = plan.generation
        server.start_time = plan.start_time
        server.scaler.keep(plan.scaled or {})
    if not plan.detach:
        server.bind(plan.sockets)
    return server.run(ready_fd, plan.pid_file, plan.old_workers)


def _daemonize(server, plan):
    """Fork the main process into the background; in the parent, the exit
    status of ``start``.

    The parent waits for the child to say it serves (or why it could not)
    through a pipe, so ``start`` reports failures and exits 1.
    """
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        return _await_ready(ready_r, pid)
    os.close(ready_r)
    os.setsid()
    if not plan.keep_output:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
    os._exit(_run_daemon(server, plan, ready_w))


def _run_daemon(server, plan, ready_fd=None):
    """The daemonized main process: stray output goes to the log."""
    if not plan.keep_output:
        sys.stdout = _LogStream(server.logger, logging.INFO)
        sys.stderr = _LogStream(server.logger, logging.ERROR)
    sys.excepthook = lambda *exc: server.logger.critical(
        'uncaught exception:\n%s', ''.join(traceback.format_exception(*exc)))
    try:
        return _serve_plan(server, plan, ready_fd)
    except BaseException:
        server.logger.exception('brimd main process failed')
        return 1


def _await_ready(ready_r, pid):
    """The child's answer: 0 when it serves, 1 with its reasons printed."""
    with os.fdopen(ready_r, 'rb') as ready:
        lines = ready.read().decode('utf-8', 'replace').splitlines()
    for line in lines:
        if line.startswith('ready '):
            return 0
    if lines:
        print(lines[0], file=sys.stderr)    # the first reason is the cause
    else:
        print('brimd (pid %d) exited while starting; see its log.' % pid,
              file=sys.stderr)
    return 1


def _wait_gone(pid, seconds):
    deadline = time.monotonic() + seconds
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _pid_alive(pid)


def _cmd_status(args):
    pid_file = _pid_file_path(args, _setting_if_any(args, 'pid_file'))
    pid = _read_pid_file(pid_file) if pid_file else None
    if pid is None:
        print('not running')
        return 3
    if not _is_brimd(pid):
        print('%d is not running' % pid)
        return 1
    print('%d is running' % pid)
    try:
        status = _ask_json(pid, b'status')
    except (OSError, ValueError):
        return 0
    for line in _status_lines(status):
        print(line)
    return 0


def _status_lines(status):
    """``status``'s report after its first line, from brimd's answer."""
    yield '  %s, up %s, restarted in place %d times' % (
        'foreground' if status['foreground'] else 'daemon',
        _duration(status['uptime']), status['generation'])
    for sub in status['subservers']:
        yield '  [%s] %s' % (sub['name'], ' '.join(sub['addresses']) or
                             sub['kind'])
        if sub['kind'] != 'daemons':
            running = sum(1 for worker in sub['workers'] if worker['pid'])
            yield ('    %d of %d workers running (workers = %s, at most %d)%s'
                   % (running, sub['target'], sub['configured'],
                      sub['max_workers'], '; latest: ' + sub['decision']
                      if sub['decision'] else ''))
        for worker in sub['workers']:
            yield _worker_line(sub['kind'], worker)


def _worker_line(kind, worker):
    """``status``'s line about one worker or daemon."""
    line = '    %s %s: ' % ('daemon' if kind == 'daemons' else 'worker',
                            worker['label'])
    if worker['state'] == 'draining':
        return line + 'pid %d, draining, %d in flight' % (
            worker['pid'], worker['in_flight'])
    if worker['pid']:
        line += 'pid %d, %s, up %s' % (worker['pid'], worker['state'],
                                       _duration(worker['uptime']))
        if kind != 'daemons':
            line += ', served %d' % worker['served']
    else:
        line += 'not running (waiting to restart)'
    line += ', restarts %d' % worker['restarts']
    if worker['last_exit']:
        line += ', last exit: %s' % worker['last_exit']
    return line


def _duration(seconds):
    seconds = int(seconds)
    if seconds < 60:
        return '%ds' % seconds
    if seconds < 3600:
        return '%dm%02ds' % divmod(seconds, 60)
    return '%dh%02dm' % divmod(seconds // 60, 60)


def _cmd_check(args):
    """Everything ``start`` would check, without serving; then the
    settings of [brim] and of each subserver, as they will run."""
    try:
        server = _load_server(args, to_stderr=True)
    except ConfError as err:
        if os.environ.get(_APP_TRACEBACK_ENV) and err.__context__:
            sys.stderr.write(_app_traceback(err.__context__))
        raise
    if _HELD_ENV in os.environ:
        held = set(json.loads(os.environ[_HELD_ENV]))
    else:
        pid_file = _pid_file_path(args, server.settings.pid_file)
        holder = _read_pid_file(pid_file) if pid_file else None
        held = (set(_ask_json(holder, b'addresses'))
                if _is_brimd(holder) else set())
    lines = ['[brim]']
    lines.extend(server.settings.lines())
    for subserver in server.subservers:
        lines.append(subserver.check(held))
        lines.extend(subserver.settings.lines())
    unused = _unused_sections(server)
    if unused:
        lines.append('sections brim does not read (an app may): %s'
                     % ', '.join('[%s]' % section for section in unused))
    print('\n'.join(lines))
    print('configuration OK')
    return 0


def _app_traceback(error):
    """The traceback of ``error`` (an app's import that failed) without
    brim's and importlib's frames: what is left names the app's files and
    lines."""
    shown = traceback.TracebackException.from_exception(error)
    machinery = (_app_traceback.__code__.co_filename, importlib.__file__)
    shown.stack = traceback.StackSummary.from_list(
        [frame for frame in shown.stack if frame.filename not in machinery
         and not frame.filename.startswith('<frozen importlib')])
    return ''.join(shown.format())


def _unused_sections(server):
    """The sections no subserver, app list or daemon list names: a
    misspelt [deamons], say.  An app may read a section of its own, so
    check only shows them."""
    used = {'brim'}
    for subserver in server.subservers:
        used.add(subserver.name)
        used.update(getattr(subserver.settings, 'apps', ()))
        used.update(getattr(subserver.settings, 'daemons', ()))
    return [section for section in server.conf.sections()
            if section not in used]


def _setting_if_any(args, name):
    """``[brim] name`` from the configuration if there is one, else its
    default: stop and status work without a configuration, and with one
    that no longer passes check (they read this option alone)."""
    try:
        conf = read_conf(args.conf or DEFAULT_CONF_FILES,
                         explicit=bool(args.conf))
    except ConfError:
        conf = Conf({})
    return _setting(conf, 'brim', _OPTION[name])[0]


#: How long past graceful_timeout a draining brimd may take to exit: a
#: second for its workers' last words, 5 s after SIGKILL, and some spare.
_EXIT_SLACK = 10.0


def _signal_brimd(args, signum, verb, seconds):
    """stop / shutdown: signal the running brimd and wait for it to go
    (``seconds``, or None: as long as a graceful shutdown may take)."""
    if seconds is None:
        seconds = (_EXIT_SLACK + _setting_if_any(args, 'graceful_timeout') +
                   _setting_if_any(args, 'shutdown_delay'))
    pid_file = _pid_file_path(args, _setting_if_any(args, 'pid_file'))
    pid = _read_pid_file(pid_file) if pid_file else None
    if not _is_brimd(pid):
        print('not running')
        return 0
    os.kill(pid, signum)
    if not _wait_gone(pid, seconds):
        # Say what it is doing: a state D (stuck in the kernel) or a wait
        # channel points at the cause, where a bare timeout does not.
        try:
            with open('/proc/%d/wchan' % pid) as fp:
                waiting = fp.read().strip()
        except OSError:
            waiting = ''
        if waiting in ('', '0'):        # some kernels hide it
            waiting = '?'
        print('%d did not %s within %ds (state %s, waiting in %s)' % (
            pid, verb, seconds, _proc_state(pid) or '?', waiting),
            file=sys.stderr)
        return 1
    return 0


def _cmd_scale(args):
    """scale [SECTION] N: have the running brimd run N workers in
    [SECTION] (every one with a fixed count when SECTION is left out)."""
    section, count = ((args.name, args.count) if args.count is not None
                      else ('*', args.name))
    pid_file = _pid_file_path(args, _setting_if_any(args, 'pid_file'))
    pid = _read_pid_file(pid_file) if pid_file else None
    if not _is_brimd(pid):
        print('not running', file=sys.stderr)
        return 1
    request = ('scale %s %s' % (section, count)).encode('utf-8')
    timeout = _ControlChannel.SCALE_SECONDS + 5.0
    with _ask(pid, request, timeout) as conn:
        answer = _read_all(conn).decode('utf-8', 'replace')
    if not answer.startswith('scaled '):
        print(answer or 'brimd %d gave no answer' % pid, file=sys.stderr)
        return 1
    print(answer)
    return 0 if '; not serving' not in answer else 1


def _cmd_start(args, command_line, restart=False):
    in_place = _in_place_plan(False, args.output)
    server = _load_server(args, to_stderr=args.output, daemon=True)
    server.restarter = _Restarter(server, command_line)
    pid_file = _pid_file_path(args, server.settings.pid_file)
    if in_place:
        # A daemonized brimd that re-executed itself (SIGUSR2).
        return _launch(server, in_place._replace(pid_file=pid_file))
    if server.fallback_log_file and not server.settings.log_file:
        print('brimd: no syslog socket here; logging to %s (set [brim] '
              'log_file to choose)' % server.fallback_log_file)
    old_pid = _read_pid_file(pid_file) if pid_file else None
    if not _is_brimd(old_pid):
        old_pid = None
    if old_pid and not restart:
        # Not an error: init scripts (LSB) expect start to succeed when
        # the service runs already.
        print('%d already running' % old_pid)
        return 0
    if old_pid and _ask_json(old_pid, b'status')['foreground']:
        return _restart_in_place_of(old_pid)
    handed_over = {}
    if old_pid:
        handed_over = _take_sockets(old_pid)
        if not handed_over:
            # No handover possible: the old brimd must let go of its ports.
            os.kill(old_pid, signal.SIGHUP)
            _wait_gone(old_pid, server.settings.graceful_timeout + _EXIT_SLACK)
            old_pid = None
    code = _launch(server, _fresh_plan(pid_file, False, args.output,
                                       handed_over))
    if code == 0 and old_pid:
        os.kill(old_pid, signal.SIGHUP)     # the new one serves: drain old
    return code


def _restart_in_place_of(pid):
    """``restart`` of a foreground brimd: it re-executes itself (same pid,
    same sockets) once its ``check`` of the configuration passes."""
    before = _ping(pid)
    with _ask(pid, b'restart', timeout=150) as conn:
        answer = conn.recv(4096).decode('utf-8', 'replace').strip()
    if answer != 'restarting':
        print(answer.replace('refused: ', '', 1) or 'brimd %d refused to '
              'restart; see its log' % pid, file=sys.stderr)
        return 1
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        generation = _ping(pid)
        if generation is not None and generation > before:
            return 0
        if not _pid_alive(pid):
            break
        time.sleep(0.05)
    print('brimd %d did not come back from its restart in place; see its '
          'log' % pid, file=sys.stderr)
    return 1


def _take_sockets(pid):
    """The running brimd's listening sockets, or {} if it cannot hand over."""
    try:
        with _ask(pid, b'sockets') as conn:
            return _receive_sockets(conn)
    except (OSError, ValueError):
        return {}


def _check_pid_file_writable(path):
    directory = os.path.dirname(path) or '.'
    if not os.path.isdir(directory):
        why = 'there is no directory %s' % directory
    elif not os.access(directory, os.W_OK):
        why = 'directory %s is not writable' % directory
    else:
        return
    raise ConfError('Cannot write the pid file %s (%s); use -p or [brim] '
                    'pid_file to name another.' % (path, why))


def _cmd_hash_password(args):
    """Print an auth_path line (or just the hash, without a NAME)."""
    name = args.name
    if name is not None and (':' in name or name.split() != [name]):
        print('A user name cannot be empty or hold spaces or a colon: %r.'
              % name, file=sys.stderr)
        return 1
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass('Password: ')
        if getpass.getpass('Again: ') != password:
            print('The two passwords differ; nothing printed.',
                  file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip('\r\n')
    if not password:
        print('The password is empty; type one, or pipe one in.',
              file=sys.stderr)
        return 1
    encoded = _hash_password(password)
    print(encoded if name is None else '%s %s' % (name, encoded))
    return 0


def _cmd_foreground(args, command_line):
    """start's process tree, attached: for containers and supervisors, and
    for ``serve``.

    A running brimd of the same pid file is an error here, unlike for
    start: the supervisor that runs foreground expects this process to be
    the server, and an exit 0 would read as the server having ended.
    """
    in_place = _in_place_plan(True, True)
    server = _load_server(args, to_stderr=True)
    server.restarter = _Restarter(server, command_line)
    _watch_for_reload(server, args)
    pid_file = None
    if args.pid_file or server.settings.pid_file:
        pid_file = _pid_file_path(args, server.settings.pid_file)
    if in_place:
        return _launch(server, in_place._replace(pid_file=pid_file))
    if pid_file:
        running = _read_pid_file(pid_file)
        if _is_brimd(running):
            print('%d already running' % running, file=sys.stderr)
            return 1
        _check_pid_file_writable(pid_file)
    return _launch(server, _fresh_plan(pid_file, True, True))


def serve(app, ip='127.0.0.1', port=8000, workers=2, **options):
    """Serve the WSGI app ``app`` (an object) as ``brim.py serve`` does.

    For projects that vendor brim.py: the calling process becomes brimd's
    main process, forks ``workers`` worker processes and supervises them
    until Ctrl-C (SIGINT) stops it or SIGTERM drains it; then it returns
    brimd's exit status, 0 (1 when a worker could not start).  Logs go to
    standard error.  ``options`` are [wsgi] options (log_format='json',
    max_body=65536, ...), as strings or numbers.  A bad option or a port
    that stays busy raises ConfError.  Call it last: it leaves its signal
    handlers installed.
    """
    wsgi = {option: str(value) for option, value in options.items()}
    wsgi.update(ip=str(ip), port=str(port), workers=str(workers))
    server = Server(Conf({'wsgi': wsgi}), to_stderr=True)
    server.configure()
    server.subservers[0].apps.append(('serve', _as_it_is(app), None))
    return _launch(server, _fresh_plan(None, True, True))


def _become_subreaper():
    """Adopt orphaned descendants, as process 1 would, so an app's
    double-forked helpers are reaped (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)      # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _cmd_no_daemon(args, command_line):
    server = _load_server(args, to_stderr=True)
    server.restarter = _Restarter(server, command_line)
    _watch_for_reload(server, args)
    server.bind()
    return _run_inline(server)


def _watch_for_reload(server, args):
    """Under --reload, give ``server`` its _Reloader, now that the apps
    are imported."""
    if not args.reload:
        return
    files = _watched_files(server.conf, server.settings.reload_extra_files)
    server.reloader = _Reloader(files)
    server.logger.info('--reload: watching %d files for changes',
                       len(files))


def _stop(args, _command_line):
    # SIGQUIT: immediate in daemon and foreground mode alike (a foreground
    # brimd drains on SIGTERM, as containers expect).
    return _signal_brimd(args, signal.SIGQUIT, 'stop', 15)


def _shutdown(args, _command_line):
    return _signal_brimd(args, signal.SIGHUP, 'shut down', None)


def _restart(args, command_line):
    return _cmd_start(args, command_line, restart=True)


def _top(args, _command_line):
    return _cmd_top(args)


def _without_command_line(command):
    return lambda args, _command_line: command(args)


#: What each command runs: function(args, command line).
_COMMANDS = {
    'serve': _cmd_foreground,
    'start': _cmd_start,
    'stop': _stop,
    'shutdown': _shutdown,
    'restart': _restart,
    'reload': _restart,
    'force-reload': _restart,
    'status': _without_command_line(_cmd_status),
    'scale': _without_command_line(_cmd_scale),
    'check': _without_command_line(_cmd_check),
    'foreground': _cmd_foreground,
    'no-daemon': _cmd_no_daemon,
    'hash-password': _without_command_line(_cmd_hash_password),
    'top': _top,
}


#: The commands that take --reload: those attached to a terminal.
_RELOADING_COMMANDS = ('foreground', 'serve', 'no-daemon')


def _misuse(args):
    """What is wrong with how the command line asks, or None."""
    if args.command not in _COMMANDS:
        return 'Unknown command %r; use one of: %s.' % (
            args.command, ', '.join(_COMMANDS))
    return _misused_arguments(args) or _misused_flags(args)


def _misused_arguments(args):
    """What is wrong with the words after the command, or None."""
    if args.command == 'scale':
        if args.name is None:
            return 'scale needs a worker count: scale [SECTION] N.'
    elif args.count is not None:
        return '%s takes at most one argument (%r is one more).' % (
            args.command, args.count)
    elif args.name is not None and args.command not in ('hash-password',
                                                        'serve', 'check'):
        return ('%s takes no argument (%r); only serve APP, check APP, '
                'scale [SECTION] N and hash-password NAME do.'
                % (args.command, args.name))
    if args.command == 'serve' and args.app is None:
        return 'serve needs the app to serve: serve package.module:app.'
    return None


def _misused_flags(args):
    """What is wrong with the options only some commands take, or None."""
    flags = [flag for flag in ('ip', 'port', 'workers')
             if getattr(args, flag) is not None]
    if flags and args.app is None:
        return ('--%s is for serve APP (and check APP); set [wsgi] %s in the '
                'configuration instead.' % (flags[0], flags[0]))
    if args.reload and args.command not in _RELOADING_COMMANDS:
        return ('--reload is for development, with foreground, serve or '
                'no-daemon; %s does not take it.' % args.command)
    if args.json and args.command != 'top':
        return '--json is for top (top --json prints one JSON snapshot).'
    return None


def main(argv=None):
    """brimd's command line; returns the exit status."""
    parser, args = _parse_args(sys.argv[1:] if argv is None else argv)
    # Only a brimd run from its own command line can run it again.
    command_line = (_CommandLine(os.path.abspath(sys.argv[0]), args)
                    if argv is None else None)
    if args.help:
        parser.print_help()
        return 0
    if args.version:
        print('brim %s' % __version__)
        return 0
    misuse = _misuse(args)
    if misuse:
        print(misuse, file=sys.stderr)
        return 1
    try:
        return _COMMANDS[args.command](args, command_line)
    except BrokenPipeError:
        return 0        # ``brimd status | head``: the reader has enough
    except Exception as err:
        if args.error_stack_trace:
            raise
        print(_one_line(err), file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------
# brim top: a live view of a running brimd
# ---------------------------------------------------------------------------

#: Seconds between two looks at the running brimd; also the interval the
#: one-shot snapshot measures its rates over.
_TOP_INTERVAL = 1.0


class _TopSampler(object):
    """Rates from successive ``status`` answers of a brimd.

    A worker's requests a second and CPU % come from the change in its
    served count and CPU seconds since the previous answer.  They are
    keyed by process id too, so a worker replaced in its slot starts
    over rather than showing the old process's count against the new.
    """

    def __init__(self):
        self.previous = {}      # (subserver, label, pid): (time, served, cpu)

    def add(self, status, now):
        """``status`` (brimd's answer, taken at monotonic time ``now``) with
        each worker's rates (None when there is nothing to compare with)
        and each subserver's totals."""
        seen = {}
        subservers = [self._subserver(sub, now, seen)
                      for sub in status['subservers']]
        self.previous = seen
        return dict(status, subservers=subservers)

    def _subserver(self, sub, now, seen):
        workers = [self._worker(sub['name'], worker, now, seen)
                   for worker in sub['workers']]
        return dict(sub, workers=workers, totals=_top_totals(sub, workers))

    def _worker(self, name, worker, now, seen):
        served, cpu = worker['served'], worker['cpu_seconds']
        key = (name, worker['label'], worker['pid'])
        before = self.previous.get(key) if worker['pid'] else None
        seen[key] = (now, served, cpu)
        rate = cpu_percent = None
        if before and now > before[0]:
            elapsed = now - before[0]
            rate = round(max(0, served - before[1]) / elapsed, 1)
            if cpu is not None and before[2] is not None:
                cpu_percent = round(max(0.0, cpu - before[2]) * 100.0 /
                                    elapsed, 1)
        return dict(worker, requests_per_second=rate, cpu_percent=cpu_percent)


def _top_totals(sub, workers):
    """A subserver's totals: workers running of its target, and the sums."""
    def total(field):
        values = [worker[field] for worker in workers
                  if worker[field] is not None]
        return round(sum(values), 1) if values else None
    running = [worker for worker in workers if worker['pid'] and
               worker['state'] not in ('draining', 'down')]
    return {'running': len(running), 'target': sub['target'],
            'requests_per_second': total('requests_per_second'),
            'served': sum(worker['served'] for worker in workers),
            'rss_bytes': total('rss_bytes'),
            'cpu_percent': total('cpu_percent')}


def _by_label(worker):
    """Workers by label, numbers in numeric order (2 before 10)."""
    label = worker['label']
    return (0, int(label), '') if label.isdigit() else (1, 0, label)


def _descending(field):
    """Workers by ``field``, largest first (unknown as 0), then label."""
    return lambda worker: (-(worker[field] or 0), _by_label(worker))


class _TopTable(object):
    """The lines top shows of a sampled status (see _TopSampler): a header
    about the main process, then per subserver a row per worker, sorted
    as chosen, with the request in flight under a busy one, and a total."""

    SORTS = (('label', _by_label),
             ('req/s', _descending('requests_per_second')),
             ('cpu', _descending('cpu_percent')),
             ('rss', _descending('rss_bytes')))
    ROW = '  %-8s %7s %-8s %6s %8s %7s %6s %8s %9s'
    TITLES = ('WORKER', 'PID', 'STATE', 'REQ/S', 'SERVED', 'RSS MB', 'CPU%',
              'UPTIME', 'RESTARTS')

    def __init__(self, live=False):
        self.live = live        # on a terminal, taking keys
        self.sort = 0

    def next_sort(self):
        self.sort = (self.sort + 1) % len(self.SORTS)

    def lines(self, view, width=None):
        """The lines, each cut to ``width`` characters when given."""
        header = 'brimd %d, %s, up %s, restarted in place %d times' % (
            view['pid'], 'foreground' if view['foreground'] else 'daemon',
            _duration(view['uptime']), view['generation'])
        if self.live:
            header += '; sorted by %s (s: sort, q: quit)' % (
                self.SORTS[self.sort][0])
        lines = [header]
        for sub in view['subservers']:
            lines.append('')
            lines.extend(self._subserver_lines(sub))
        return [line.rstrip()[:width] for line in lines]

    def _subserver_lines(self, sub):
        title = '[%s] %s' % (sub['name'],
                             ' '.join(sub['addresses']) or sub['kind'])
        if sub['kind'] != 'daemons':        # daemons: one each, always
            title += ' (workers = %s)' % sub['configured']
        if sub['decision']:
            title += '; latest: ' + sub['decision']
        lines = [title, self.ROW % self.TITLES]
        for worker in sorted(sub['workers'], key=self.SORTS[self.sort][1]):
            lines.append(self._worker_row(worker))
            if worker['request']:
                lines.append('      in flight %s: %s' % (
                    _top_value('%.1fs', worker['request_seconds']),
                    worker['request']))
        totals = sub['totals']
        lines.append(self.ROW % (
            'total', '%d/%d' % (totals['running'], totals['target']), '',
            _top_value('%.1f', totals['requests_per_second']),
            totals['served'], _top_megabytes(totals['rss_bytes']),
            _top_value('%.1f', totals['cpu_percent']), '', ''))
        return lines

    def _worker_row(self, worker):
        return self.ROW % (
            worker['label'], _top_value('%d', worker['pid']), worker['state'],
            _top_value('%.1f', worker['requests_per_second']),
            worker['served'], _top_megabytes(worker['rss_bytes']),
            _top_value('%.1f', worker['cpu_percent']),
            '-' if worker['uptime'] is None else _duration(worker['uptime']),
            worker['restarts'])


def _top_value(form, value):
    return '-' if value is None else form % value


def _top_megabytes(size):
    return '-' if size is None else '%.1f' % (size / 1048576.0)


class _AnsiScreen(object):
    """The terminal driven with plain ANSI escape codes, where curses is
    missing or cannot set the terminal up (an unknown TERM): the
    alternate screen, no cursor, keys read unbuffered (cbreak)."""

    def __init__(self):
        import termios
        import tty
        self.out = sys.stdout
        self.fd_in = 0 if os.isatty(0) else None      # keys from stdin
        self.saved = None
        if self.fd_in is not None:
            self.saved = termios.tcgetattr(self.fd_in)
            tty.setcbreak(self.fd_in)
        self.out.write('\x1b[?1049h\x1b[?25l')

    def close(self):
        import termios
        self.out.write('\x1b[?25h\x1b[?1049l')
        self.out.flush()
        if self.saved is not None:
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self.saved)

    def width(self):
        try:
            return os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError):
            return 80

    def show(self, lines):
        """Draw ``lines`` (cut to the width already) from the top left,
        as many as fit; clear what is left of the previous screen."""
        try:
            height = os.get_terminal_size(self.out.fileno()).lines
        except (OSError, ValueError):
            height = 24
        self.out.write('\x1b[H' + '\x1b[K\r\n'.join(lines[:height]) +
                       '\x1b[K\x1b[J')
        self.out.flush()

    def key(self, seconds):
        """The key typed within ``seconds``, or None."""
        if self.fd_in is None:
            time.sleep(max(0.0, seconds))
            return None
        ready = select.select([self.fd_in], [], [], max(0.0, seconds))[0]
        if not ready:
            return None
        typed = os.read(self.fd_in, 1)
        if not typed:           # end of input: go on showing, time only
            self.fd_in = None
        return typed.decode('latin-1')


class _CursesScreen(object):
    """The terminal driven by curses; raises curses.error where it cannot
    set the terminal up."""

    def __init__(self, curses):
        self.curses = curses
        self.window = curses.initscr()
        curses.noecho()
        curses.cbreak()
        self.window.keypad(True)
        try:
            curses.curs_set(0)
        except curses.error:    # a terminal that cannot hide its cursor
            pass

    def close(self):
        self.window.keypad(False)
        self.curses.nocbreak()
        self.curses.echo()
        self.curses.endwin()

    def width(self):
        # Writing the bottom right cell moves the cursor past the end,
        # which curses reports as an error: keep the last column free.
        return max(1, self.window.getmaxyx()[1] - 1)

    def show(self, lines):
        height = self.window.getmaxyx()[0]
        self.window.erase()
        for row, line in enumerate(lines[:height]):
            try:
                self.window.addstr(row, 0, line)
            except self.curses.error:   # shrunk since the lines were cut
                pass
        self.window.refresh()

    def key(self, seconds):
        """The key typed within ``seconds``, '' for a resize or a key that
        is no character, or None."""
        self.window.timeout(max(0, int(seconds * 1000)))
        typed = self.window.getch()
        if typed == -1:
            return None
        return chr(typed) if 0 <= typed < 256 else ''


def _open_top_screen():
    """curses where it sets the terminal up, else ANSI escape codes."""
    try:
        import curses
    except ImportError:
        return _AnsiScreen()
    try:
        return _CursesScreen(curses)
    except curses.error:
        return _AnsiScreen()


def _cmd_top(args):
    """top: a live view of the running brimd; one snapshot (text or JSON)
    when standard output is not a terminal or with --json."""
    pid = _top_pid(args)
    if pid is None:
        print('not running', file=sys.stderr)
        return 1
    if args.json or not sys.stdout.isatty():
        return _top_snapshot(args, pid)
    screen = _open_top_screen()
    try:
        pid = _top_live(args, pid, screen)
    except KeyboardInterrupt:
        pid = None
    finally:
        screen.close()
    if pid:
        print('brimd %d is gone' % pid, file=sys.stderr)
        return 1
    return 0


def _top_pid(args):
    """The pid of the brimd the pid file names, or None."""
    pid_file = _pid_file_path(args, _setting_if_any(args, 'pid_file'))
    pid = _read_pid_file(pid_file) if pid_file else None
    return pid if _is_brimd(pid) else None


def _top_status(args, pid):
    """(pid, status) of brimd ``pid``, or of the brimd that replaced it
    (``restart`` starts one with a new pid); (pid, None) when neither
    answers."""
    for candidate in (pid, _top_pid(args)):
        if candidate:
            try:
                return candidate, _ask_json(candidate, b'status')
            except (OSError, ValueError):
                pass
    return pid, None


def _top_snapshot(args, pid):
    """Print one table (or JSON) with the rates measured over a second."""
    sampler = _TopSampler()
    for look in range(2):
        if look:
            time.sleep(_TOP_INTERVAL)
        pid, status = _top_status(args, pid)
        if status is None:
            print('brimd %d is gone' % pid, file=sys.stderr)
            return 1
        view = sampler.add(status, time.monotonic())
    if args.json:
        print(json.dumps(view, indent=1, sort_keys=True))
    else:
        print('\n'.join(_TopTable().lines(view)))
    return 0


def _top_live(args, pid, screen):
    """Redraw ``screen`` every second until q; the pid of the brimd that
    went away, or None after q."""
    sampler, table = _TopSampler(), _TopTable(live=True)
    while True:
        pid, status = _top_status(args, pid)
        if status is None:
            return pid
        view = sampler.add(status, time.monotonic())
        screen.show(table.lines(view, screen.width()))
        next_look = time.monotonic() + _TOP_INTERVAL
        while True:
            typed = screen.key(next_look - time.monotonic())
            if typed is None:
                break
            if typed in ('q', 'Q'):
                return None
            if typed in ('s', 'S'):
                table.next_sort()
            # Any key (a resize too) redraws at the width it finds now.
            screen.show(table.lines(view, screen.width()))


# ---------------------------------------------------------------------------
# The stats page: the HTML WSGIStats answers a browser
# ---------------------------------------------------------------------------

# The page WSGIStats answers a browser: everything inline (no resource from
# elsewhere, so it works on a server without internet), the data polled
# from ?format=json and put in with textContent only.  $nonce lets the
# Content-Security-Policy allow exactly this style and script.
_STATS_PAGE = string.Template('''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>brimd stats</title>
<style nonce="$nonce">
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --dim: #6b7280;
  --line: #e3e6eb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: baseline;
  gap: 0 1.5em; padding: 12px 24px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
header span { color: #c5cad3; font-size: 13px; }
header span.error { color: #fca5a5; }
main { display: grid; gap: 16px; padding: 16px 24px;
  grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); }
section { background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; padding: 14px 16px; }
h2 { margin: 0; font-size: 15px; display: flex;
  justify-content: space-between; align-items: baseline; }
h2 small { color: var(--dim); font-weight: normal; font-size: 12px;
  text-transform: uppercase; letter-spacing: .05em; }
.rate { font-size: 26px; font-weight: 600; margin-top: 4px;
  font-variant-numeric: tabular-nums; }
.rate small { font-size: 13px; font-weight: normal; color: var(--dim); }
svg { display: block; width: 100%; height: 110px; margin-top: 6px;
  background: #fafbfc; border: 1px solid var(--line); border-radius: 4px; }
svg .grid { stroke: var(--line); stroke-width: 1;
  vector-effect: non-scaling-stroke; }
svg .line { fill: none; stroke: var(--accent); stroke-width: 2;
  vector-effect: non-scaling-stroke; stroke-linejoin: round; }
svg .area { fill: var(--accent); opacity: .12; }
.axis { display: flex; justify-content: space-between; color: var(--dim);
  font-size: 11px; margin-bottom: 10px; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 10px; }
.chip { border-radius: 999px; padding: 2px 10px; font-size: 12px;
  background: #eef0f3; font-variant-numeric: tabular-nums; }
.chip b { margin-right: 4px; }
.s2xx { background: #dcfce7; color: #14532d; }
.s3xx { background: #dbeafe; color: #1e3a8a; }
.s4xx { background: #fef3c7; color: #78350f; }
.s5xx { background: #fee2e2; color: #7f1d1d; }
table { width: 100%; border-collapse: collapse;
  font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 3px 6px;
  border-bottom: 1px solid var(--line); }
th:first-child, td:first-child { text-align: left; }
th { color: var(--dim); font-weight: 500; font-size: 12px; }
td.down { color: #dc2626; font-weight: 600; }
p.totals { color: var(--dim); font-size: 12px; margin: 8px 0 0; }
</style>
</head>
<body data-source="?format=json" data-refresh="$refresh">
<header><h1>brimd</h1><span id="started"></span>
<span id="status">loading&hellip;</span></header>
<main id="subservers"></main>
<noscript><p>This page needs JavaScript; the numbers themselves are at
<a href="?format=json">?format=json</a>.</p></noscript>
<script nonce="$nonce">
(function () {
  'use strict';
  var WINDOW = 300;   // seconds of history a chart shows
  var CLASSES = ['2xx', '3xx', '4xx', '5xx'];
  var source = document.body.getAttribute('data-source');
  var refresh = (Number(document.body.getAttribute('data-refresh')) ||
                 2) * 1000;
  var samples = {};   // series name -> [[seconds, count], ...]

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = String(text); }
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    Object.keys(attrs).forEach(function (name) {
      node.setAttribute(name, attrs[name]);
    });
    return node;
  }

  function row(cells, tag) {
    var tr = el('tr');
    cells.forEach(function (cell) {
      var td = el(tag || 'td', cell.className, cell.text);
      tr.appendChild(td);
    });
    return tr;
  }

  function duration(seconds) {
    var units = [[86400, 'd'], [3600, 'h'], [60, 'm'], [1, 's']];
    var parts = [];
    units.forEach(function (unit) {
      if (parts.length < 2 && (seconds >= unit[0] || unit[0] === 1)) {
        parts.push(Math.floor(seconds / unit[0]) + unit[1]);
        seconds -= Math.floor(seconds / unit[0]) * unit[0];
      }
    });
    return parts.join(' ');
  }

  function perSecond(value) {
    if (value === null) { return '\\u2013'; }
    return value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2);
  }

  // What a subserver's chart follows: requests for WSGI, else its first
  // stat summed over the workers (bytes for TCP echo, datagrams for UDP).
  function counterOf(entry) {
    if (typeof entry.request_count === 'number') { return 'request_count'; }
    return Object.keys(entry).filter(function (name) {
      return typeof entry[name] === 'number' && name !== 'start_time';
    }).sort()[0] || null;
  }

  // Adds a sample; keeps one older than the window so lines reach its edge.
  function record(series, value, now) {
    var list = samples[series] || (samples[series] = []);
    list.push([now, value]);
    while (list.length > 2 && list[1][0] < now - WINDOW) { list.shift(); }
    return list;
  }

  function rates(list) {
    var points = [];
    for (var i = 1; i < list.length; i += 1) {
      var seconds = list[i][0] - list[i - 1][0];
      if (seconds > 0) {
        points.push([list[i][0],
                     Math.max(0, list[i][1] - list[i - 1][1]) / seconds]);
      }
    }
    return points;
  }

  function latest(points) {
    return points.length ? points[points.length - 1][1] : null;
  }

  // The chart spans the samples so far, up to WINDOW, then moves on.
  function chart(points, now) {
    var peak = 0;
    var span = points.length ?
      Math.min(WINDOW, Math.max(10, now - points[0][0])) : WINDOW;
    points.forEach(function (point) { peak = Math.max(peak, point[1]); });
    var scale = peak > 0 ? peak : 1;   // a flat line sits at the bottom
    var root = svg('svg', {viewBox: '0 0 300 100',
                           preserveAspectRatio: 'none', role: 'img'});
    [25, 50, 75].forEach(function (y) {
      root.appendChild(svg('line', {x1: 0, x2: 300, y1: y, y2: y,
                                    'class': 'grid'}));
    });
    if (points.length) {
      var xy = points.map(function (point) {
        return ((point[0] - now + span) / span * 300).toFixed(1) + ',' +
          (100 - point[1] / scale * 94).toFixed(1);
      });
      var left = xy[0].split(',')[0], right = xy[xy.length - 1].split(',')[0];
      root.appendChild(svg('polygon', {
        'class': 'area',
        points: left + ',100 ' + xy.join(' ') + ' ' + right + ',100'}));
      root.appendChild(svg('polyline', {'class': 'line',
                                        points: xy.join(' ')}));
    }
    return {node: root, peak: peak, span: span};
  }

  function rateBlock(section, name, entry, counter, now) {
    var points = rates(record(name, entry[counter], now));
    var label = counter === 'request_count' ? 'requests' : counter;
    var big = el('div', 'rate', perSecond(latest(points)));
    big.appendChild(el('small', '', ' ' + label + '/s'));
    section.appendChild(big);
    var drawn = chart(points, now);
    section.appendChild(drawn.node);
    var axis = el('div', 'axis');
    axis.appendChild(el('span', '', duration(drawn.span) + ' ago'));
    axis.appendChild(el('span', '', 'peak ' + perSecond(drawn.peak) + '/s'));
    axis.appendChild(el('span', '', 'now'));
    section.appendChild(axis);
  }

  function statusChips(section, name, entry, now) {
    var chips = el('div', 'chips');
    CLASSES.forEach(function (cls) {
      var total = entry['status_' + cls + '_count'] || 0;
      var points = rates(record(name + ' ' + cls, total, now));
      var chip = el('span', 'chip s' + cls);
      chip.appendChild(el('b', '', cls));
      chip.appendChild(document.createTextNode(
        total.toLocaleString('en-US') + ' \\u00b7 ' +
        perSecond(latest(points)) + '/s'));
      chips.appendChild(chip);
    });
    section.appendChild(chips);
  }

  function workerTable(section, kind, entry, workers, counter) {
    var daemon = kind === 'daemons';
    var extra = [];
    if (daemon) {
      workers.forEach(function (w) {
        Object.keys(entry[w.label] || {}).forEach(function (name) {
          if (name !== 'start_time' && extra.indexOf(name) < 0) {
            extra.push(name);
          }
        });
      });
    } else if (counter) {
      extra.push(counter);
    }
    var heads = [daemon ? 'daemon' : 'worker', 'pid', 'uptime'];
    var table = el('table');
    table.appendChild(row(heads.concat(extra, ['restarts']).map(
      function (text) { return {text: text === 'request_count' ?
                                'requests' : text}; }), 'th'));
    workers.forEach(function (w) {
      var stats = entry[w.label] || {};
      var cells = [{text: w.label},
                   w.pid ? {text: w.pid, className: 'pid'} :
                   {text: 'down', className: 'down'},
                   {text: w.pid ? duration(w.uptime) : '\\u2013'}];
      extra.forEach(function (name) {
        cells.push({text: statText(name, stats[name] || 0)});
      });
      cells.push({text: w.restarts});
      table.appendChild(row(cells));
    });
    section.appendChild(table);
  }

  // A stat named last_* holding seconds since the epoch (a daemon's
  // last_run) reads as a time, with the date when not today; the rest as
  // counts.
  function statText(name, value) {
    if (/^last_/.test(name) && value > 1e9) {
      var when = new Date(value * 1000);
      return when.toDateString() === new Date().toDateString() ?
        when.toLocaleTimeString() : when.toLocaleString();
    }
    return value.toLocaleString('en-US');
  }

  function otherTotals(section, entry, shown) {
    var names = Object.keys(entry).filter(function (name) {
      return typeof entry[name] === 'number' && shown.indexOf(name) < 0;
    }).sort();
    if (names.length) {
      section.appendChild(el('p', 'totals', names.map(function (name) {
        return name + ' ' + statText(name, entry[name]);
      }).join(' \\u00b7 ')));
    }
  }

  function card(name, entry, workers, scale, now) {
    var kind = workers[0].kind;
    var section = el('section');
    section.setAttribute('data-subserver', name);
    var title = el('h2', '', name);
    title.appendChild(el('small', '', kind));
    if (scale && kind !== 'daemons') {
      title.appendChild(el('small', 'scale', scale.running + ' of ' +
                           scale.target + ' workers running'));
    }
    section.appendChild(title);
    var counter = kind === 'daemons' ? null : counterOf(entry);
    var shown = ['start_time', counter];
    if (counter) { rateBlock(section, name, entry, counter, now); }
    if (kind === 'wsgi') {
      statusChips(section, name, entry, now);
      shown = shown.concat(CLASSES.map(function (cls) {
        return 'status_' + cls + '_count';
      }));
    }
    workerTable(section, kind, entry, workers, counter);
    otherTotals(section, entry, shown);
    return section;
  }

  function render(data) {
    var now = Date.now() / 1000;
    var groups = {}, order = [];
    (data.workers || []).forEach(function (w) {
      if (!groups[w.subserver]) {
        groups[w.subserver] = [];
        order.push(w.subserver);
      }
      groups[w.subserver].push(w);
    });
    var main = document.getElementById('subservers');
    main.textContent = '';
    order.forEach(function (name) {
      main.appendChild(card(name, data[name] || {}, groups[name],
                            (data.scale || {})[name], now));
    });
    document.getElementById('started').textContent = 'started ' +
      new Date(data.start_time * 1000).toLocaleString();
    var status = document.getElementById('status');
    status.className = '';
    status.textContent = 'updated ' + new Date().toLocaleTimeString() +
      ', every ' + refresh / 1000 + ' s';
  }

  function fail(err) {
    var status = document.getElementById('status');
    status.className = 'error';
    status.textContent = 'cannot read the stats (' + err.message +
      '); trying again';
  }

  function poll() {
    fetch(source, {cache: 'no-store', headers: {Accept: 'application/json'}})
      .then(function (response) {
        if (!response.ok) {
          throw new Error(response.status + ' ' + response.statusText);
        }
        return response.json();
      })
      .then(render)
      .catch(fail)
      .then(function () { setTimeout(poll, refresh); });
  }

  poll();
}());
</script>
</body>
</html>
''')


_register_submodules(sys.modules[__name__])

if __name__ == '__main__':
    # Run as the module ``brim`` so apps that ``import brim`` share this
    # copy of every class (one Server, one set of stats).
    sys.modules.setdefault('brim', sys.modules[__name__])
    _register_submodules(sys.modules['brim'])
    sys.exit(main())
