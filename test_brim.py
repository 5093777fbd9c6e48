"""Tests for brim.py: real brimd processes, real clients, loopback only.

Run with ``python3 -m unittest -v test_brim`` from the checkout.

Every test that starts a brimd does it with ``brimd -c CONF -p PID start``
(the script that imports brim; the tests about ``python3 brim.py`` itself
run that) in its own temporary directory, talks to it over 127.0.0.1 and
stops it in a cleanup (``stop``, then SIGKILL by pid for anything left).
Test apps are Python source written into the temporary directory at test
time.

Speed note: brimd's main process is an orphan once ``start`` returns.  Where
the kernel allows it, this test process makes itself a child subreaper
(prctl PR_SET_CHILD_SUBREAPER) and reaps those orphans promptly, so ``stop``
does not wait for a slow init to reap the exited main process.
"""

import base64
import collections
import contextlib
import fcntl
import grp
import hashlib
import importlib
import http.client as httpclient
import io
import itertools
import json
import logging
import logging.config
import logging.handlers
import os
import pty
import pwd
import queue
import random
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import struct
import sys
import tempfile
import termios
import textwrap
import threading
import time
import types
import unittest
import unittest.mock
from wsgiref.validate import validator as wsgiref_validator

HERE = os.path.dirname(os.path.abspath(__file__))
BRIM = os.path.join(HERE, 'brim.py')
BRIMD = os.path.join(HERE, 'brimd')
SAMPLE = os.path.join(HERE, 'brimd.conf-sample')

if HERE not in sys.path:
    sys.path.insert(0, HERE)
import brim  # noqa: E402  (pure functions are tested in-process)


# ---------------------------------------------------------------------------
# Process helpers: /proc, a reaper for orphaned brimd processes, running brim
# ---------------------------------------------------------------------------

_proc_lock = threading.Lock()
_protected = set()      # pids of our own subprocess.Popen children


def proc_stat(pid):
    """(state, ppid) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open('/proc/%d/stat' % pid) as fp:
            data = fp.read()
    except (OSError, ValueError):
        return None
    fields = data.rsplit(')', 1)[1].split()
    return fields[0], int(fields[1])


def proc_cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as fp:
            return fp.read().replace(b'\0', b' ').decode('utf-8', 'replace')
    except OSError:
        return ''


def pid_alive(pid):
    """True when ``pid`` exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ('Z', 'X')


def children_of(pid):
    """Pids whose parent is ``pid`` (zombies included), via /proc."""
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[1] == pid:
                found.append(int(name))
    return found


def live_children_of(pid):
    return [p for p in children_of(pid) if pid_alive(p)]


def descendants_of(pid):
    found = []
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def zombie_children(pid):
    """Children of ``pid`` that exited and were not reaped yet."""
    return [p for p in children_of(pid) if (proc_stat(p) or ('',))[0] == 'Z']


def proc_status(pid):
    """/proc/``pid``/status as {field: value}; {} when it is gone."""
    try:
        with open('/proc/%d/status' % pid) as fp:
            return dict(line.rstrip('\n').split(':\t', 1) for line in fp
                        if ':\t' in line)
    except OSError:
        return {}


def cpu_seconds(pid):
    """User plus system CPU seconds ``pid`` has used so far."""
    with open('/proc/%d/stat' % pid) as fp:
        fields = fp.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _reap_orphans():
    """Reap exited children that are not our own Popen objects."""
    me = os.getpid()
    while True:
        time.sleep(0.02)
        try:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG |
                             os.WNOWAIT)
        except ChildProcessError:
            continue
        if peek is None:
            continue
        with _proc_lock:
            for pid in children_of(me):
                if pid in _protected:
                    continue
                stat = proc_stat(pid)
                if stat is not None and stat[0] == 'Z':
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass


def _become_subreaper():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:     # PR_SET_CHILD_SUBREAPER
            return False
    except Exception:
        return False
    threading.Thread(target=_reap_orphans, daemon=True,
                     name='orphan-reaper').start()
    return True


SUBREAPER = sys.platform.startswith('linux') and _become_subreaper()


def popen(cmd, **kwargs):
    """subprocess.Popen whose pid the orphan reaper leaves alone."""
    with _proc_lock:
        proc = subprocess.Popen(cmd, **kwargs)
        _protected.add(proc.pid)
    return proc


def end_process(proc):
    """Cleanup for a popen() child: SIGTERM, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    _protected.discard(proc.pid)


def kill_process(proc):
    """Cleanup for a popen() child that need not end gracefully: SIGKILL."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    _protected.discard(proc.pid)


def run(cmd, cwd=None, env=None, timeout=40, preexec_fn=None):
    """Run ``cmd``; (exit code, stdout text, stderr text)."""
    proc = popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError('%r did not finish in %ss; stdout %r stderr %r'
                             % (cmd, timeout, out, err))
    finally:
        _protected.discard(proc.pid)
    return (proc.returncode, out.decode('utf-8', 'replace'),
            err.decode('utf-8', 'replace'))


def wait_until(fn, timeout=10.0, interval=0.02, msg=None):
    """Poll ``fn`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except Exception as err:    # a poll may hit a half-ready state
            last = err
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError('%s (not true after %.1fs; last %r)' % (
                msg or getattr(fn, '__name__', 'condition'), timeout,
                last))
        time.sleep(interval)


# ---------------------------------------------------------------------------
# Network helpers
# ---------------------------------------------------------------------------

def free_port(kind=socket.SOCK_STREAM):
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def free_udp_port():
    return free_port(socket.SOCK_DGRAM)


def connect_refused(port):
    """True when nothing accepts on 127.0.0.1:``port``."""
    sock = socket.socket()
    sock.settimeout(2)
    try:
        sock.connect(('127.0.0.1', port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return False


def listening_addresses(port):
    """Local addresses with a TCP socket listening on ``port`` (IPv4)."""
    found = []
    with open('/proc/net/tcp') as fp:
        next(fp)
        for line in fp:
            fields = line.split()
            local, state = fields[1], fields[3]
            host_hex, port_hex = local.split(':')
            if state == '0A' and int(port_hex, 16) == port:
                packed = bytes.fromhex(host_hex)[::-1]
                found.append(socket.inet_ntoa(packed))
    return found


class Response(object):
    def __init__(self, status, reason, headers, body, head):
        self.status = status
        self.reason = reason
        self.headers = headers      # {lower-case name: value}
        self.body = body
        self.head = head            # the raw head bytes


def read_response(fp, method='GET'):
    """One HTTP response from the binary file ``fp``; None at EOF."""
    status_line = fp.readline()
    if not status_line:
        return None
    head = [status_line]
    headers = {}
    while True:
        line = fp.readline()
        head.append(line)
        if line in (b'\r\n', b'\n', b''):
            break
        name, _, value = line.decode('latin-1').partition(':')
        headers[name.strip().lower()] = value.strip()
    parts = status_line.decode('latin-1').split(' ', 2)
    status = int(parts[1])
    reason = parts[2].strip() if len(parts) > 2 else ''
    if status < 200 or status in (204, 304) or method == 'HEAD':
        body = b''
    elif 'chunked' in headers.get('transfer-encoding', '').lower():
        body = b''
        while True:
            size = int(fp.readline().split(b';')[0].strip(), 16)
            if size == 0:
                while fp.readline() not in (b'\r\n', b''):
                    pass
                break
            body += fp.read(size)
            fp.read(2)
    elif 'content-length' in headers:
        body = fp.read(int(headers['content-length']))
    else:
        body = fp.read()
    return Response(status, reason, headers, body, b''.join(head))


def udp_exchange(port, data, timeout=2.0, tries=3):
    """Send ``data`` to 127.0.0.1:``port`` and return the reply datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        for _ in range(tries):
            sock.sendto(data, ('127.0.0.1', port))
            try:
                reply, _addr = sock.recvfrom(65536)
                return reply
            except socket.timeout:
                continue
        raise AssertionError('no UDP reply from port %d to %r' % (port, data))
    finally:
        sock.close()


def read_until_closed(sock):
    """Every byte ``sock`` receives until the other end closes."""
    return brim._read_all(sock)


def tcp_exchange(port, data, timeout=5.0):
    """Connect, send ``data``, half-close, read until EOF (like nc -q)."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    try:
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)
    finally:
        sock.close()


class StaleConnection(Exception):
    """A reused keep-alive connection ended before any response byte."""


class HTTPClient(object):
    """HTTP/1.1 on one connection, kept open between requests.

    ``request`` raises StaleConnection when a *reused* connection fails
    before any byte of the response arrived: a server may close an idle
    keep-alive connection at any time, and that is the one failure RFC
    9112 section 9.3.1 lets a client retry on a new connection (as urllib3
    and browsers do).  Any other failure is raised as it is.
    """

    def __init__(self, port, timeout=10, context=None):
        self.port = port
        self.timeout = timeout
        self.context = context      # an ssl.SSLContext for HTTPS
        self.sock = self.fp = None
        self.used = False           # a response already came on this one

    def connect(self):
        sock = socket.create_connection(('127.0.0.1', self.port),
                                        timeout=self.timeout)
        if self.context is not None:
            try:
                sock = self.context.wrap_socket(sock,
                                                server_hostname='localhost')
            except BaseException:
                sock.close()
                raise
        self.sock, self.fp, self.used = sock, sock.makefile('rb'), False

    def close(self):
        for thing in (self.fp, self.sock):
            if thing is not None:
                thing.close()
        self.sock = self.fp = None

    def request(self, method, path, body=b'', headers=()):
        """Send one request and read its Response."""
        if self.sock is None:
            self.connect()
        reused = self.used
        head = '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n' \
               '%s\r\n' % (method, path, len(body),
                           ''.join('%s: %s\r\n' % h for h in headers))
        try:
            try:
                self.sock.sendall(head.encode('latin-1') + body)
                first = self.fp.peek(1)
            except socket.timeout:
                raise
            except OSError as err:
                if reused:
                    raise StaleConnection(repr(err))
                raise
            if not first:
                if reused:
                    raise StaleConnection('closed before the response')
                raise ConnectionError('closed before any response byte')
            response = read_response(self.fp, method)
        except BaseException:
            self.close()
            raise
        self.used = True
        if response.headers.get('connection', '').lower() == 'close':
            self.close()
        return response


class Hammer(object):
    """Clients POSTing to ``path`` (an echo) without pause until stopped.

    ``fresh`` clients open a new connection per request; ``keep_alive``
    ones reuse theirs.  Every body is unique and checked.  A keep-alive
    client retries a request once on a new connection after a
    StaleConnection (counted in ``retries``); a failure on a new
    connection, a wrong body or a status other than 200 is an error.
    """

    def __init__(self, port, fresh=3, keep_alive=3, path='/echo',
                 limit=90.0, cap=200000):
        self.port = port
        self.path = path
        self.lock = threading.Lock()
        self.ok = {'fresh': 0, 'keep-alive': 0}
        self.retries = 0
        self.errors = []
        self.cap = cap                  # bounds a runaway test
        self.deadline = time.monotonic() + limit
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._client,
                                         args=(index, index < fresh))
                        for index in range(fresh + keep_alive)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.done.set()
        for thread in self.threads:
            thread.join(30)

    @property
    def served(self):
        return sum(self.ok.values())

    def figures(self):
        return '%d answered (%d fresh, %d keep-alive), %d retries, ' \
               '%d errors' % (self.served, self.ok['fresh'],
                              self.ok['keep-alive'], self.retries,
                              len(self.errors))

    def _client(self, index, fresh):
        kind = 'fresh' if fresh else 'keep-alive'
        client = HTTPClient(self.port)
        try:
            for count in itertools.count():
                if self.done.is_set() or time.monotonic() > self.deadline \
                        or self.served + len(self.errors) >= self.cap:
                    return
                body = b'client %d request %d' % (index, count)
                try:
                    try:
                        response = client.request('POST', self.path, body)
                    except StaleConnection:
                        with self.lock:
                            self.retries += 1
                        response = client.request('POST', self.path, body)
                    result = (response.status, response.body)
                except Exception as err:
                    result = ('error', repr(err))
                with self.lock:
                    if result == (200, body):
                        self.ok[kind] += 1
                    else:
                        self.errors.append((kind, body, result))
                if fresh:
                    client.close()
        finally:
            client.close()


# ---------------------------------------------------------------------------
# TLS certificates, made here in pure Python (no openssl command needed)
# ---------------------------------------------------------------------------

_SMALL_PRIMES = [p for p in range(3, 2000, 2)
                 if all(p % q for q in range(3, int(p ** 0.5) + 1, 2))]


def _probable_prime(bits):
    """A random ``bits``-bit prime (Miller-Rabin, 16 rounds)."""
    while True:
        n = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if any(n % p == 0 for p in _SMALL_PRIMES):
            continue
        d, s = n - 1, 0
        while not d & 1:
            d, s = d >> 1, s + 1
        for _ in range(16):
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(s - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                break       # a witness: n is composite
        else:
            return n


def _der(tag, content):
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, 'big')
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_int(value):
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, 'big'))


def _der_seq(*items):
    return _der(0x30, b''.join(items))


def _der_oid(dotted):
    numbers = [int(n) for n in dotted.split('.')]
    out = bytes([40 * numbers[0] + numbers[1]])
    for number in numbers[2:]:
        chunk = [number & 0x7f]
        number >>= 7
        while number:
            chunk.insert(0, 0x80 | (number & 0x7f))
            number >>= 7
        out += bytes(chunk)
    return _der(0x06, out)


def _pem(kind, der):
    text = base64.b64encode(der).decode('ascii')
    return '-----BEGIN %s-----\n%s\n-----END %s-----\n' % (
        kind, '\n'.join(text[i:i + 64] for i in range(0, len(text), 64)),
        kind)


def make_self_signed(name='localhost', bits=2048):
    """(certificate PEM, RSA key PEM): self-signed for ``name`` and
    127.0.0.1, valid for a day, with the extensions strict verifiers want.
    """
    e = 65537
    while True:
        p, q = _probable_prime(bits // 2), _probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    n = p * q
    d = pow(e, -1, phi)
    key = _der_seq(*map(_der_int, (0, n, e, d, p, q, d % (p - 1),
                                   d % (q - 1), pow(q, -1, p))))
    sha256_rsa = _der_seq(_der_oid('1.2.840.113549.1.1.11'), _der(5, b''))
    subject = _der_seq(_der(0x31, _der_seq(_der_oid('2.5.4.3'),
                                           _der(0x0c, name.encode()))))
    now = time.time()
    validity = _der_seq(*(_der(0x17, time.strftime(
        '%y%m%d%H%M%SZ', time.gmtime(t)).encode())
        for t in (now - 3600, now + 86400)))
    public = _der_seq(_der_int(n), _der_int(e))
    key_id = hashlib.sha1(public).digest()
    extensions = _der(0xa3, _der_seq(
        _der_seq(_der_oid('2.5.29.19'), _der(0x01, b'\xff'),     # CA:TRUE
                 _der(0x04, _der_seq(_der(0x01, b'\xff')))),
        _der_seq(_der_oid('2.5.29.14'), _der(0x04, _der(0x04, key_id))),
        _der_seq(_der_oid('2.5.29.35'),
                 _der(0x04, _der_seq(_der(0x80, key_id)))),
        _der_seq(_der_oid('2.5.29.17'), _der(0x04, _der_seq(
            _der(0x82, name.encode()), _der(0x87, bytes([127, 0, 0, 1])))))))
    tbs = _der_seq(
        _der(0xa0, _der_int(2)), _der_int(secrets.randbits(63)), sha256_rsa,
        subject, validity, subject,
        _der_seq(_der_seq(_der_oid('1.2.840.113549.1.1.1'), _der(5, b'')),
                 _der(0x03, b'\0' + public)),
        extensions)
    digest_info = bytes.fromhex('3031300d060960864801650304020105000420') + \
        hashlib.sha256(tbs).digest()
    size = (n.bit_length() + 7) // 8
    padded = b'\0\1' + b'\xff' * (size - len(digest_info) - 3) + b'\0' + \
        digest_info
    signature = pow(int.from_bytes(padded, 'big'), d, n).to_bytes(size, 'big')
    cert = _der_seq(tbs, sha256_rsa, _der(0x03, b'\0' + signature))
    return _pem('CERTIFICATE', cert), _pem('RSA PRIVATE KEY', key)


_CERTS = {}


def self_signed(which=0):
    """A certificate and key made once per test run (``which`` picks one of
    several, for a key that does not match another's certificate)."""
    if which not in _CERTS:
        _CERTS[which] = make_self_signed()
    return _CERTS[which]


# ---------------------------------------------------------------------------
# Test apps, written into each test's temporary directory
# ---------------------------------------------------------------------------

APP_SOURCES = {}

# The documentation's WSGI HelloWorld, step by step, with bytes bodies.
APP_SOURCES['mywsgi.py'] = '''
from time import time


class PlainHelloWorld(object):

    def __init__(self, name, conf, next_app):
        self.next_app = next_app

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != '/helloworld':
            return self.next_app(env, start_response)
        body = b'Hello World!\\n'
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return body


class HelloWorld(object):

    def __init__(self, name, conf, next_app):
        self.name = name
        self.path = conf
        self.next_app = next_app

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != self.path:
            return self.next_app(env, start_response)
        # Here's where we update the stats.
        env['brim.stats'].incr('%s.requests' % self.name)
        env['brim.stats'].set('%s.last_called' % self.name, time())
        body = b'Hello World!\\n'
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return body

    @classmethod
    def parse_conf(cls, name, conf):
        path = conf.get(name, 'path')
        if not path:
            raise Exception('[%s] you must configure a path to serve.' % name)
        return path

    @classmethod
    def stats_conf(cls, name, conf):
        return [('%s.requests' % name, 'sum'),
                ('%s.last_called' % name, 'max')]
'''

# One WSGI app with a path per behaviour under test.
APP_SOURCES['myapps.py'] = '''
import os
import signal
import socket
import time
from wsgiref.validate import validator


def plain_app(env, start_response):
    body = b'validated'
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', str(len(body)))])
    return [body]


class Closing(object):
    """An iterable body that records each close() call in a file."""

    def __init__(self, path):
        self.path = path

    def __iter__(self):
        yield b'part1-'
        yield b'part2'

    def close(self):
        with open(self.path, 'a') as fp:
            fp.write('closed\\n')


class SlowInit(object):
    """An app whose constructor takes ``delay`` seconds (loading data)."""

    def __init__(self, name, conf, next_app):
        time.sleep(float(conf.get(name, 'delay', '0.5')))
        self.next_app = next_app

    def __call__(self, env, start_response):
        return self.next_app(env, start_response)


class Misc(object):
    """/pid /port /slow /txn /raise /str /write /gen /closing /valid ..."""

    def __init__(self, name, conf, next_app):
        self.name = name
        self.dir = conf
        self.next_app = next_app
        self.validated = validator(plain_app)

    @classmethod
    def parse_conf(cls, name, conf):
        return conf.get(name, 'dir', '')

    def __call__(self, env, start_response):
        handler = getattr(self, 'do_' + env['PATH_INFO'][1:], None)
        if handler is None:
            return self.next_app(env, start_response)
        return handler(env, start_response)

    def _reply(self, start_response, body, status='200 OK'):
        start_response(status, [('Content-Type', 'text/plain'),
                                ('Content-Length', str(len(body)))])
        return [body]

    def do_pid(self, env, start_response):
        return self._reply(start_response, str(os.getpid()).encode())

    def do_port(self, env, start_response):
        return self._reply(start_response, env['REMOTE_PORT'].encode())

    def do_peer(self, env, start_response):
        # What an app learns of its client, and the URLs it would build
        # (as Flask's url_for does) from wsgi.url_scheme.
        import json
        import wsgiref.util
        keys = ('REMOTE_ADDR', 'REMOTE_PORT', 'brim.client_addr',
                'wsgi.url_scheme', 'HTTPS')
        seen = {key: env.get(key) for key in keys}
        seen['request_uri'] = wsgiref.util.request_uri(env)
        seen['application_uri'] = wsgiref.util.application_uri(env)
        return self._reply(start_response, json.dumps(seen).encode())

    def do_slow(self, env, start_response):
        with open(os.path.join(self.dir, 'slow-started'), 'a') as fp:
            fp.write('x')
        time.sleep(float(env.get('QUERY_STRING') or 1.5))
        return self._reply(start_response, b'slow:' + b'x' * 5000 + b':done')

    def do_txn(self, env, start_response):
        env['brim.logger'].info('app-line-marker during the request')
        env['brim.log_info'].extend(['myapp:', 'info-one', 'info-two'])
        return self._reply(start_response, env['brim.txn'].encode())

    def do_raise(self, env, start_response):
        raise ValueError('app-raised-marker')

    def do_str(self, env, start_response):
        start_response('200 OK', [('Content-Length', '10')])
        return ['a str body']

    def do_write(self, env, start_response):
        write = start_response('200 OK', [('Content-Length', '11')])
        write(b'hello ')
        return [b'world']

    def do_gen(self, env, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])

        def generate():
            yield b'hello'
            yield b' world'
        return generate()

    def do_closing(self, env, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return Closing(os.path.join(self.dir,
                                    'closed-' + env['QUERY_STRING']))

    def do_valid_without_brim_key(self, env, start_response):
        # env['brim'] is brimd's documented extension (the subserver); the
        # validator wants every undotted key to be a CGI str, so this one
        # sees the environ without it. Every other key is checked as served.
        env = dict(env)
        del env['brim']
        return self.validated(env, start_response)

    def do_slowecho(self, env, start_response):
        time.sleep(float(env['QUERY_STRING']))
        return self._reply(start_response, env['wsgi.input'].read())

    def do_scheme(self, env, start_response):
        return self._reply(start_response, ('%s %s' % (
            env['wsgi.url_scheme'], env.get('HTTPS', '-'))).encode())

    def do_fault(self, env, start_response):
        """Breaks WSGI the way QUERY_STRING names."""
        fault = env['QUERY_STRING']
        if fault == 'nostart_list':
            return [b'no start_response']
        if fault == 'nostart_bytes':
            return b'no start_response'
        if fault == 'nostart_empty':
            return iter([])
        if fault == 'header_int':
            start_response('200 OK', [('X-Count', 1)])
        elif fault == 'header_bytes':
            start_response('200 OK', [(b'X-Name', 'v')])
        return [b'bad headers']

    def do_nodelay(self, env, start_response):
        subserver = env['brim']
        port = int(env['REMOTE_PORT'])
        for conn in list(getattr(subserver, 'connections', ())):
            sock = getattr(conn, 'sock', None)
            try:
                if sock is not None and sock.getpeername()[1] == port:
                    value = sock.getsockopt(socket.IPPROTO_TCP,
                                            socket.TCP_NODELAY)
                    return self._reply(start_response,
                                       b'nodelay=%d' % bool(value))
            except OSError:
                pass
        return self._reply(start_response, b'unknown')


class CrashInInit(object):
    """Notes each construction (monotonic time) in the file ``starts``;
    raises while the file ``flag`` exists."""

    def __init__(self, name, conf, next_app):
        with open(conf.get(name, 'starts'), 'a') as fp:
            fp.write('%f\\n' % time.monotonic())
        if os.path.exists(conf.get(name, 'flag')):
            raise RuntimeError('crash-in-init-marker')
        self.next_app = next_app

    def __call__(self, env, start_response):
        return self.next_app(env, start_response)


class InitRaises(object):
    """Raises in its constructor, which runs in the worker, after
    ``delay`` seconds."""

    def __init__(self, name, conf, next_app):
        time.sleep(float(conf.get(name, 'delay', '0')))
        raise RuntimeError('init-raises-marker')


class IgnoresTerm(object):
    """A worker deaf to SIGTERM, as an app stuck in a C call can be."""

    def __init__(self, name, conf, next_app):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.next_app = next_app

    def __call__(self, env, start_response):
        return self.next_app(env, start_response)


class Gauges(object):
    """/gauge?N sets this worker's max stat ``peak`` and min stat ``low``
    to N and adds N to the sum stat ``odd-name.total``."""

    def __init__(self, name, conf, next_app):
        self.next_app = next_app

    @classmethod
    def stats_conf(cls, name, conf):
        return [('peak', 'max'), ('low', 'min'), ('odd-name.total', 'sum'),
                ('hits', 'sum'), ('hits_total', 'max'),
                ('start_time_seconds', 'max')]

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != '/gauge':
            return self.next_app(env, start_response)
        value = int(env['QUERY_STRING'])
        stats = env['brim.stats']
        stats.set('peak', value)
        stats.set('low', value)
        stats.incr('odd-name.total', value)
        start_response('200 OK', [('Content-Length', '0')])
        return []
'''

# The documentation's TCP HelloWorld (final version), plus test handlers.
APP_SOURCES['mytcp.py'] = '''
import os
import socket
from time import time


class HelloWorld(object):

    def __init__(self, name, conf):
        # conf is what was returned from parse_conf now.
        self.message = conf
        self.name = name

    def __call__(self, subserver, stats, sock, ip, port):
        sock.send((self.message + '\\n').encode('utf-8'))
        sock.close()
        # Here's where we update the stats.
        stats.incr('connections')
        stats.set('last_called', time())

    @classmethod
    def parse_conf(cls, name, conf):
        message = conf.get(name, 'message')
        if not message:
            raise Exception(
                '[%s] you must configure a message to serve.' % name)
        return message

    @classmethod
    def stats_conf(cls, name, conf):
        return [('connections', 'sum'), ('last_called', 'max')]


class Raiser(object):
    """Raises on a connection that starts with boom; else answers ok:."""

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, ip, port):
        data = sock.recv(100)
        if data.startswith(b'boom'):
            raise ValueError('tcp-boom-marker')
        sock.sendall(b'ok:' + data)


class Peer(object):
    """Answers each connection with the ip and port it was handed."""

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, ip, port):
        sock.sendall(('%s %s' % (ip, port)).encode())


class NoDelay(object):
    """Answers whether its connection has TCP_NODELAY set."""

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, ip, port):
        value = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.sendall(b'nodelay=%d' % bool(value))


class Pid(object):
    """Answers each connection with this worker's pid."""

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, ip, port):
        sock.sendall(str(os.getpid()).encode())
'''

# The documentation's UDP HelloWorld (final version), plus a raising one.
APP_SOURCES['myudp.py'] = '''
import os
from time import time


class HelloWorld(object):

    def __init__(self, name, conf):
        # conf is what was returned from parse_conf now.
        self.message = conf
        self.name = name

    def __call__(self, subserver, stats, sock, datagram, ip, port):
        sock.sendto((self.message + '\\n').encode('utf-8'), (ip, port))
        # Here's where we update the stats.
        stats.set('last_called', time())

    @classmethod
    def parse_conf(cls, name, conf):
        message = conf.get(name, 'message')
        if not message:
            raise Exception('[%s] you must configure a message to serve.' %
                            name)
        return message

    @classmethod
    def stats_conf(cls, name, conf):
        return [('last_called', 'max')]


class Raiser(object):

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, datagram, ip, port):
        if datagram.startswith(b'boom'):
            raise ValueError('udp-boom-marker')
        sock.sendto(b'ok:' + datagram, (ip, port))


class Pid(object):
    """Answers each datagram with this worker's pid."""

    def __init__(self, name, conf):
        self.name = name

    def __call__(self, subserver, stats, sock, datagram, ip, port):
        sock.sendto(str(os.getpid()).encode(), (ip, port))
'''

# The documentation's daemon HelloWorld (final version), plus a crasher.
APP_SOURCES['mydaemon.py'] = '''
from time import sleep, time


class HelloWorld(object):

    def __init__(self, name, conf):
        # conf is what was returned from parse_conf now.
        self.message = conf
        self.name = name

    def __call__(self, subserver, stats):
        line = 0
        while True:
            line += 1
            subserver.logger.info('%s %s' % (self.message, line))
            # Here's where we update the stats.
            stats.set('last_logged', time())
            sleep(60)

    @classmethod
    def parse_conf(cls, name, conf):
        message = conf.get(name, 'message')
        if not message:
            raise Exception('[%s] you must configure a message to log.' %
                            name)
        return message

    @classmethod
    def stats_conf(cls, name, conf):
        return [('last_logged', 'daemon')]


class Crasher(object):
    """Records each start in a file, then crashes (after ``delay``)."""

    def __init__(self, name, conf):
        self.path = conf.get(name, 'path')
        self.delay = float(conf.get(name, 'delay', '0'))

    def __call__(self, subserver, stats):
        with open(self.path, 'a') as fp:
            fp.write('start\\n')
        sleep(self.delay)
        raise RuntimeError('crasher-marker: crashing on purpose')
'''


# ---------------------------------------------------------------------------
# The base test case
# ---------------------------------------------------------------------------

REQUEST_LINE_RE = re.compile(
    r' (?P<method>GET|HEAD|POST|PUT|DELETE) (?P<path>\S+) '
    r'(?P<protocol>HTTP/\d\.\d) (?P<status>\d{3}|-) (?P<rest>.*)$')


def parse_request_line(line):
    """The fields of a request log line, or None if it is not one."""
    if ' NOTICE ' not in line:
        return None
    match = REQUEST_LINE_RE.search(line)
    if not match:
        return None
    rest = match.group('rest').split(' ')
    # After the status: bytes out, bytes in, referer, user agent, txn,
    # seconds, then the brim.log_info words.
    fields = match.groupdict()
    fields['txn'] = rest[4] if len(rest) > 4 else None
    fields['extra'] = rest[6:]
    fields['line'] = line
    return fields


class BrimTestCase(unittest.TestCase):
    """Base: a temporary directory, confs, brimd processes and clients."""

    maxDiff = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='brim-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pid_file = os.path.join(self.tmp, 'brimd.pid')
        self.log_file = os.path.join(self.tmp, 'brim.log')
        self.conf_path = None
        self.main_pids = []          # every brimd main pid this test saw
        self.seen_pids = set()       # and every worker/daemon pid
        self.env = dict(os.environ)
        self.env['PYTHONPATH'] = os.pathsep.join(
            [self.tmp, HERE] + ([os.environ['PYTHONPATH']]
                                if os.environ.get('PYTHONPATH') else []))
        self.env.pop('PYTHONSTARTUP', None)
        for name, source in APP_SOURCES.items():
            with open(os.path.join(self.tmp, name), 'w') as fp:
                fp.write(source)
        self.addCleanup(self._stop_everything)

    # -- configuration --------------------------------------------------------

    def write_conf(self, text, name='brimd.conf', log_file=True):
        """Write a conf into the temp dir, with [brim] log_file added."""
        text = textwrap.dedent(text).lstrip('\n')
        if log_file:
            line = 'log_file = %s' % self.log_file
            if re.search(r'^\[brim\][ \t]*$', text, re.M):
                text = re.sub(r'^\[brim\][ \t]*$', lambda m: '[brim]\n' + line,
                              text, count=1, flags=re.M)
            else:
                text = '[brim]\n%s\n\n%s' % (line, text)
        path = os.path.join(self.tmp, name)
        with open(path, 'w') as fp:
            fp.write(text)
        if name == 'brimd.conf' or self.conf_path is None:
            self.conf_path = path
        return path

    # -- running brim ---------------------------------------------------------

    def brim(self, *args, conf=None, pid_file=None, script=None, env=None,
             cwd=None, timeout=40, preexec_fn=None):
        """Run brimd's ``-c CONF -p PID args``: (code, stdout, stderr).

        By default through the brimd script, which imports brim (compiled
        once, then from __pycache__), where ``python3 brim.py`` compiles
        all of brim.py at every run: a tenth of a second a command.  The
        tests that are about brim.py itself name it (``script=BRIM``, or
        run it directly).
        """
        if script is None:
            cmd = [sys.executable, BRIMD]
        elif script.endswith('.py'):
            cmd = [sys.executable, script]
        else:
            cmd = [script]
        conf = conf or self.conf_path
        if conf:
            cmd += ['-c', conf]
        pid_file = pid_file or self.pid_file
        if pid_file:
            cmd += ['-p', pid_file]
        cmd += list(args)
        return run(cmd, cwd=cwd or self.tmp, env=env or self.env,
                   timeout=timeout, preexec_fn=preexec_fn)

    def run_attached(self, *command, prefix=(), env=None):
        """``brim.py -c CONF -p PID COMMAND`` attached (after ``prefix``),
        its output in attached.out; killed in a cleanup, and the workers
        it has then with it."""
        out = open(os.path.join(self.tmp, 'attached.out'), 'wb')
        self.addCleanup(out.close)
        proc = popen(list(prefix) + [sys.executable, BRIM, '-c',
                                     self.conf_path, '-p', self.pid_file] +
                     list(command), cwd=self.tmp, env=env or self.env,
                     stdout=out, stderr=subprocess.STDOUT)
        self.track(proc.pid)

        def end():
            self.seen_pids.update(descendants_of(proc.pid))
            kill_process(proc)
        self.addCleanup(end)
        return proc

    def read_pid(self, pid_file=None):
        try:
            with open(pid_file or self.pid_file) as fp:
                return int(fp.read().strip())
        except (OSError, ValueError):
            return None

    def track(self, pid):
        if pid and pid not in self.main_pids:
            self.main_pids.append(pid)
        if pid:
            self.seen_pids.update(descendants_of(pid))

    def start(self, *extra, conf=None, **kwargs):
        """``start``; asserts success and returns the main pid."""
        code, out, err = self.brim(*(extra + ('start',)), conf=conf,
                                   **kwargs)
        pid = self.read_pid(kwargs.get('pid_file'))
        self.track(pid)
        self.assertEqual(code, 0, 'start failed: stdout %r stderr %r log %r'
                         % (out, err, self.log_text()[-3000:]))
        self.assertEqual(err, '')
        self.assertIsNotNone(pid, 'start wrote no pid file')
        self.assertTrue(pid_alive(pid), 'brimd %d is not running' % pid)
        return pid

    def assert_start_refused(self, port, *needles):
        """``start`` exits 1 with one stderr line matching every needle (a
        regex) and leaves nothing running (no pid file, ``port`` closed)."""
        before = set(children_of(os.getpid()))
        code, out, err = self.brim('start')
        pid = self.read_pid()
        if code == 0 and pid:       # wrongly started: stop it before failing
            self.track(pid)
            self.brim('stop')
        self.assertEqual(code, 1, 'start did not fail: stdout %r stderr %r'
                         % (out, err))
        self.assertEqual(err.count('\n'), 1, err)
        for needle in needles:
            self.assertRegex(err, needle)
        self.assertFalse(os.path.exists(self.pid_file))
        wait_until(lambda: not [p for p in set(children_of(os.getpid())) -
                                before if pid_alive(p)],
                   msg='processes left running by a failed start')
        self.assertTrue(connect_refused(port))
        return err

    def stop(self, conf=None, **kwargs):
        """``stop``; asserts it succeeded."""
        code, out, err = self.brim('stop', conf=conf, **kwargs)
        self.assertEqual((code, err), (0, ''), out)
        return code

    def _stop_everything(self):
        """Cleanup: stop each brimd as ``stop`` does (SIGQUIT: at once, in
        daemon and foreground mode alike), without the cost of running the
        command; then SIGKILL whatever is left."""
        me = os.getpid()
        for pid in list(self.main_pids):
            self.seen_pids.update(descendants_of(pid))
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
        try:
            wait_until(lambda: not any(pid_alive(p) for p in self.main_pids),
                       timeout=10)
        except AssertionError:
            pass
        for pid in list(self.main_pids) + sorted(self.seen_pids):
            stat = proc_stat(pid)
            if stat is None or stat[0] == 'Z':
                continue
            # Only ours: still in the brimd tree, reparented to us, or brim.
            if stat[1] in self.main_pids or stat[1] == me or \
                    pid in self.main_pids or 'brim' in proc_cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            wait_until(lambda: not any(pid_alive(p) for p in
                                       list(self.main_pids) +
                                       list(self.seen_pids)), timeout=5)
        except AssertionError:
            pass

    # -- observing ------------------------------------------------------------

    def log_text(self, path=None):
        try:
            with open(path or self.log_file, encoding='utf-8',
                      errors='replace') as fp:
                return fp.read()
        except OSError:
            return ''

    def log_lines(self):
        return self.log_text().splitlines()

    def wait_for_log(self, pattern, timeout=10, count=1):
        """Wait until ``pattern`` (regex) matches ``count`` log lines."""
        regex = re.compile(pattern)

        def found():
            hits = [l for l in self.log_lines() if regex.search(l)]
            return hits if len(hits) >= count else None
        try:
            return wait_until(found, timeout=timeout)
        except AssertionError:
            self.fail('log never matched %r; log:\n%s'
                      % (pattern, self.log_text()[-4000:]))

    def request_lines(self):
        return [f for f in map(parse_request_line, self.log_lines()) if f]

    def assert_gone(self, pids, timeout=10):
        pids = list(pids)
        try:
            wait_until(lambda: not any(pid_alive(p) for p in pids),
                       timeout=timeout)
        except AssertionError:
            self.fail('still running: %r' % [p for p in pids
                                             if pid_alive(p)])

    # -- clients --------------------------------------------------------------

    def http(self, port, method='GET', path='/', body=None, headers=None,
             timeout=10):
        """One request on a new connection: (status, headers, body)."""
        conn = httpclient.HTTPConnection('127.0.0.1', port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return (resp.status, {k.lower(): v for k, v in
                                  resp.getheaders()}, data)
        finally:
            conn.close()

    def raw(self, port, data, timeout=5):
        """Send ``data`` on a new connection; every byte until EOF."""
        sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        try:
            sock.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b''.join(chunks)
        finally:
            sock.close()

    def stats_only_conf(self, wsgi_extra='', stats_extra=''):
        """One [wsgi] on ``self.port`` serving WSGIStats alone."""
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = stats
            %s

            [stats]
            call = brim.wsgi_stats.WSGIStats
            %s
            ''' % (self.port, wsgi_extra, stats_extra))

    def stats(self, port, path='/stats'):
        status, _headers, body = self.http(port, 'GET', path)
        self.assertEqual(status, 200, body)
        return json.loads(body.decode('utf-8'))

    def load(self, port, path, total, threads=8, keep_alive=False,
             method='GET'):
        """``total`` requests from ``threads`` threads: [(status, body)]."""
        results = []
        lock = threading.Lock()
        counter = itertools.count()

        def client():
            conn = None
            try:
                while True:
                    with lock:
                        index = next(counter)
                    if index >= total:
                        return
                    try:
                        if conn is None:
                            conn = httpclient.HTTPConnection(
                                '127.0.0.1', port, timeout=20)
                        conn.request(method, path)
                        resp = conn.getresponse()
                        result = (resp.status, resp.read())
                    except Exception as err:
                        result = ('error', repr(err))
                        conn.close()
                        conn = None
                    if not keep_alive and conn is not None:
                        conn.close()
                        conn = None
                    with lock:
                        results.append(result)
            finally:
                if conn is not None:
                    conn.close()

        workers = [threading.Thread(target=client) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        return results

    def echo_ok(self, port, path='/echo', payload=b'Just a test.'):
        status, _headers, body = self.http(port, 'POST', path, payload)
        self.assertEqual((status, body), (200, payload))


# ---------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------

class TestConfInProcess(unittest.TestCase):
    """brim.Conf and brim.read_conf, called directly (no processes)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='brim-conf-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, 'w') as fp:
            fp.write(textwrap.dedent(text).lstrip('\n'))
        return path

    def test_getters_convert_and_default(self):
        conf = brim.Conf({'s': {'i': '42', 'f': '2.5', 'b1': 'yes',
                                'b0': 'off', 'p': '~/x', 'raw': ' v '}})
        self.assertEqual(conf.get('s', 'raw'), ' v ')
        self.assertIsNone(conf.get('s', 'missing'))
        self.assertEqual(conf.get('nosection', 'x', 'dflt'), 'dflt')
        self.assertEqual(conf.get_int('s', 'i', 0), 42)
        self.assertEqual(conf.get_int('s', 'missing', 7), 7)
        self.assertEqual(conf.get_float('s', 'f', 0.0), 2.5)
        self.assertEqual(conf.get_float('s', 'missing', 1.5), 1.5)
        self.assertIs(conf.get_bool('s', 'b1', False), True)
        self.assertIs(conf.get_bool('s', 'b0', True), False)
        self.assertIs(conf.get_bool('s', 'missing', True), True)
        self.assertEqual(conf.get_path('s', 'p'),
                         os.path.join(os.path.expanduser('~'), 'x'))
        self.assertEqual(conf.get_path('s', 'missing', '/d'), '/d')

    def test_bool_words(self):
        for word in ('1', 'on', 't', 'true', 'y', 'yes', 'TRUE', 'Yes'):
            self.assertIs(brim.Conf({'s': {'o': word}}).get_bool(
                's', 'o', False), True, word)
        for word in ('0', 'off', 'f', 'false', 'n', 'no', 'NO'):
            self.assertIs(brim.Conf({'s': {'o': word}}).get_bool(
                's', 'o', True), False, word)

    def test_bad_values_name_section_and_option(self):
        conf = brim.Conf({'wsgi': {'port': 'abc', 'f': 'x', 'b': 'maybe'}})
        with self.assertRaises(brim.ConfError) as caught:
            conf.get_int('wsgi', 'port', 80)
        self.assertEqual(str(caught.exception), "Configuration value [wsgi] "
                         "port of 'abc' cannot be converted to int.")
        with self.assertRaises(brim.ConfError) as caught:
            conf.get_float('wsgi', 'f', 1.0)
        self.assertEqual(str(caught.exception), "Configuration value [wsgi] "
                         "f of 'x' cannot be converted to float.")
        with self.assertRaises(brim.ConfError) as caught:
            conf.get_bool('wsgi', 'b', False)
        self.assertIn("[wsgi] b of 'maybe'", str(caught.exception))

    def test_read_conf_files_and_percent(self):
        path = self.write('a.conf', '''
            [wsgi]
            port = 8080
            fmt = 100% of %(name)s
            ''')
        conf = brim.read_conf([path], explicit=True)
        self.assertEqual(conf.files, [path])
        self.assertEqual(conf.get_int('wsgi', 'port', 0), 8080)
        self.assertEqual(conf.get('wsgi', 'fmt'), '100% of %(name)s')
        self.assertIn('wsgi', conf.sections())

    def test_read_conf_additional_confs(self):
        extra = self.write('extra.conf', '''
            [echo]
            path = /more
            ''')
        main = self.write('main.conf', '''
            [brim]
            additional_confs = %s

            [wsgi]
            apps = echo
            ''' % extra)
        conf = brim.read_conf([main], explicit=True)
        self.assertEqual(conf.files, [main, extra])
        self.assertEqual(conf.get('echo', 'path'), '/more')
        self.assertEqual(conf.get('wsgi', 'apps'), 'echo')

    def test_read_conf_later_file_wins(self):
        first = self.write('1.conf', '[wsgi]\nport = 1\nip = a\n')
        second = self.write('2.conf', '[wsgi]\nport = 2\n')
        conf = brim.read_conf([first, second], explicit=True)
        self.assertEqual(conf.files, [first, second])
        self.assertEqual(conf.get('wsgi', 'port'), '2')
        self.assertEqual(conf.get('wsgi', 'ip'), 'a')

    def test_read_conf_missing_additional_conf_is_an_error(self):
        missing = os.path.join(self.tmp, 'nope.conf')
        main = self.write('main.conf', '[brim]\nadditional_confs = %s\n'
                          % missing)
        with self.assertRaises(brim.ConfError) as caught:
            brim.read_conf([main], explicit=True)
        self.assertIn(missing, str(caught.exception))

    def test_read_conf_missing_files(self):
        missing = os.path.join(self.tmp, 'missing.conf')
        with self.assertRaises(brim.ConfError) as caught:
            brim.read_conf([missing], explicit=True)
        self.assertEqual(str(caught.exception),
                         'Configuration file %s was not found.' % missing)
        with self.assertRaises(brim.ConfError) as caught:
            brim.read_conf([missing, '~/x.conf'], explicit=False)
        self.assertEqual(str(caught.exception), 'No configuration found: '
                         'there is no %s or %s; name a file with -c CONF.'
                         % (missing, os.path.expanduser('~/x.conf')))

    def test_read_conf_syntax_error(self):
        path = self.write('bad.conf', 'no section header here\n')
        with self.assertRaises(brim.ConfError) as caught:
            brim.read_conf([path], explicit=True)
        self.assertIn(path, str(caught.exception))
        self.assertNotIn('\n', str(caught.exception))


class _Undeclared(object):
    """An app class that does not declare its options: not checked."""

    def __init__(self, name, conf, next_app):
        pass


class TestSettingsInProcess(unittest.TestCase):
    """brim's table of options and its reader, called directly."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='brim-settings-')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def read(self, store, section, kind=None):
        return brim._read_settings(brim.Conf(store), section,
                                   kind or section.split('#')[0])

    def refusal(self, store, section, kind=None):
        with self.assertRaises(brim.ConfError) as caught:
            self.read(store, section, kind)
        return str(caught.exception)

    def subserver(self, conf, section):
        """A parsed subserver of ``conf`` (a Conf or its store)."""
        if not isinstance(conf, brim.Conf):
            conf = brim.Conf(conf)
        cls = brim._SUBSERVER_KINDS[section.split('#')[0]]
        subserver = cls(brim.Server(conf), section)
        subserver.configure(conf)
        return subserver

    def parse_refusal(self, store, section):
        with self.assertRaises(brim.ConfError) as caught:
            self.subserver(store, section)
        return str(caught.exception)

    def test_unknown_option_in_brims_own_sections(self):
        for section, typo, meant in (
                ('brim', 'pid_fiel', 'pid_file'),
                ('brim', 'gracefull_timeout', 'graceful_timeout'),
                ('wsgi', 'prot', 'port'),
                ('wsgi', 'aps', 'apps'),
                ('wsgi#alt', 'worker', 'workers'),
                ('daemons', 'deamons', 'daemons')):
            self.assertEqual(
                self.refusal({section: {typo: '1'}}, section),
                "[%s] unknown option '%s' (did you mean '%s'?)"
                % (section, typo, meant))
        self.assertEqual(
            self.refusal({'wsgi': {'max_header': '1'}}, 'wsgi'),
            "[wsgi] unknown option 'max_header' (did you mean "
            "'max_header_line', 'max_header_count' or 'log_headers'?)")
        self.assertEqual(
            self.refusal({'wsgi': {'zzzz': '1'}}, 'wsgi'),
            "[wsgi] unknown option 'zzzz' (the README lists brim's options "
            "under Configuration)")
        # A Conf made in code keeps case; configparser lowers it.
        self.assertEqual(self.refusal({'wsgi': {'Port': '1'}}, 'wsgi'),
                         "[wsgi] unknown option 'Port' (did you mean "
                         "'port'?)")

    def test_brim_gives_defaults_but_takes_no_section_only_option(self):
        settings = self.read({'brim': {'workers': '3', 'port': '81',
                                       'max_body': '9'}}, 'brim')
        self.assertEqual((str(settings.workers), settings.port,
                          settings.max_body), ('3', 81, 9))
        wsgi = self.read({'brim': {'workers': '3'}, 'wsgi': {'port': '82'}},
                         'wsgi')
        self.assertEqual((str(wsgi.workers), wsgi.port), ('3', 82))
        self.assertIn('  workers = 3  # from [brim]', list(wsgi.lines()))
        self.assertIn('  port = 82', list(wsgi.lines()))
        self.assertIn('  backlog = 4096  # default', list(wsgi.lines()))
        for option, where in (('apps', 'wsgi'), ('daemons', 'daemons')):
            self.assertEqual(self.refusal({'brim': {option: 'x'}}, 'brim'),
                             "[brim] unknown option '%s' (%s belongs in "
                             "[%s])" % (option, option, where))
        # An option of another section says where it belongs.
        for section, option, where in (
                ('wsgi', 'pid_file', '[brim]'),
                ('wsgi', 'max_datagram_size', '[udp] or [brim]'),
                ('daemons', 'port', '[wsgi], [tcp], [udp] or [brim]'),
                ('brim', 'call', '[tcp] or [udp]')):
            self.assertEqual(
                self.refusal({section: {option: '1'}}, section),
                "[%s] unknown option '%s' (%s belongs in %s)"
                % (section, option, option, where))

    def test_tcp_and_udp_refuse_near_misses_and_pass_the_rest(self):
        for kind in ('tcp', 'udp'):
            for typo, meant in (('prot', 'port'), ('workrs', 'workers'),
                                ('Port', 'port'), ('cal', 'call'),
                                ('backlg', 'backlog')):
                self.assertEqual(
                    self.refusal({kind: {typo: '1'}}, kind),
                    "[%s] unknown option '%s' (did you mean '%s'?)"
                    % (kind, typo, meant))
            # Two letters are too few to judge: ``id`` is the handler's.
            settings = self.read({kind: {'port': '5', 'message': 'hi',
                                         'id': '7', 'chunk': '9'}}, kind)
            self.assertEqual(settings._passed, ('message', 'id', 'chunk'))
            self.assertEqual(list(settings.lines())[-1],
                             '  passed to the handler: message, id, chunk')
        self.assertTrue(self.refusal({'wsgi': {'message': 'hi'}}, 'wsgi')
                        .startswith("[wsgi] unknown option 'message' ("))
        # max_datagram_size is udp's; in [tcp] it is the handler's.
        self.assertEqual(self.read({'tcp': {'max_datagram_size': '1'}},
                                   'tcp')._passed, ('max_datagram_size',))

    def test_shipped_apps_refuse_options_they_do_not_know(self):
        serve_path = self.tmp
        users = os.path.join(self.tmp, 'users')
        with open(users, 'w') as fp:
            fp.write('')
        for call, good, typo, meant in (
                ('brim.wsgi_echo.WSGIEcho', {'path': '/e', 'max_echo': '5'},
                 'max_ecoh', 'max_echo'),
                ('brim.wsgi_stats.WSGIStats',
                 {'path': '/s', 'refresh': '1', 'metrics_path': '/m'},
                 'refesh', 'refresh'),
                ('brim.wsgi_fs.WSGIFS', {'serve_path': serve_path},
                 'serve_pth', 'serve_path'),
                ('brim.wsgi_basic_auth.WSGIBasicAuth',
                 {'auth_path': users, 'realm': 'r', 'check_interval': '1',
                  'unauthed_paths': '/x'}, 'relm', 'realm')):
            store = {'wsgi': {'apps': 'app'}, 'app': dict(good, call=call)}
            self.subserver(store, 'wsgi')
            store['app'][typo] = '1'
            self.assertEqual(self.parse_refusal(store, 'wsgi'),
                             "[app] unknown option '%s' (did you mean "
                             "'%s'?)" % (typo, meant))
        store = {'wsgi': {'apps': 'echo'},
                 'echo': {'call': 'brim.wsgi_echo.WSGIEcho', 'zzz': '1'}}
        self.assertEqual(self.parse_refusal(store, 'wsgi'),
                         "[echo] unknown option 'zzz' (WSGIEcho knows call, "
                         "path, max_echo)")
        store = {'daemons': {'daemons': 'sample'},
                 'sample': {'call': 'brim.daemon_sample.DaemonSample',
                            'intervals': '5'}}
        self.assertEqual(self.parse_refusal(store, 'daemons'),
                         "[sample] unknown option 'intervals' (did you mean "
                         "'interval'?)")
        # A handler that declares its options shares its section with
        # brim's: the rest are refused, not passed.
        tcp = {'call': 'brim.tcp_echo.TCPEcho', 'port': '0',
               'chunk_read': '9'}
        self.assertEqual(self.subserver({'tcp': tcp}, 'tcp').settings._passed,
                         ('chunk_read',))
        tcp['message'] = 'hi'
        self.assertEqual(
            self.parse_refusal({'tcp': tcp}, 'tcp'),
            "[tcp] unknown option 'message' (TCPEcho knows call, chunk_read; "
            "the README lists brim's options under Configuration)")
        udp = {'call': 'brim.udp_echo.UDPEcho', 'port': '0',
               'chunk_read': '9'}
        self.assertEqual(self.parse_refusal({'udp': udp}, 'udp'),
                         "[udp] unknown option 'chunk_read' (UDPEcho knows "
                         "call; the README lists brim's options under "
                         "Configuration)")

    def test_apps_that_declare_nothing_are_not_checked(self):
        call = '%s._Undeclared' % __name__
        subserver = self.subserver(
            {'wsgi': {'apps': 'app'},
             'app': {'call': call, 'anything': '1', 'prot': '2'}}, 'wsgi')
        self.assertEqual(subserver.apps[0][:2], ('app', _Undeclared))

    def test_default_section_options_are_not_the_sections_own(self):
        path = os.path.join(self.tmp, 'brimd.conf')
        with open(path, 'w') as fp:
            fp.write(textwrap.dedent('''
                [DEFAULT]
                workers = 2
                colour = blue

                [brim]

                [wsgi]
                port = 0
                apps = echo

                [echo]
                call = brim.wsgi_echo.WSGIEcho

                [tcp]
                port = 0
                call = brim.tcp_echo.TCPEcho
                workers = 3

                [udp]
                port = 0
                call = brim.udp_echo.UDPEcho
                message = hi
                '''))
        conf = brim.read_conf([path], explicit=True)
        self.assertEqual(conf.get('echo', 'colour'), 'blue')   # as before
        self.assertEqual(conf.own_options('echo'), ['call'])
        wsgi = self.subserver(conf, 'wsgi')
        self.assertEqual(wsgi.settings.workers, (2, 2))
        self.assertEqual(self.subserver(conf, 'tcp').settings.workers, (3, 3))
        self.assertEqual(brim._read_settings(conf, 'brim', 'brim').workers,
                         (2, 2))
        self.assertEqual(brim._read_settings(conf, 'udp', 'udp')._passed,
                         ('message',))

    def test_serve_refuses_an_unknown_option(self):
        with self.assertRaises(brim.ConfError) as caught:
            brim.serve(_Undeclared, prot=8911)
        self.assertEqual(str(caught.exception), "[wsgi] unknown option "
                         "'prot' (did you mean 'port'?)")

    def test_the_originals_options_are_accepted_and_ignored(self):
        store = {'brim': {'eventlet_hub': 'poll'},
                 'wsgi': {'log_auth_tokens': 'yes',
                          'wsgi_input_iter_chunk_size': '4096',
                          'wsgi_output_iter_chunk_size': '4096'},
                 'tcp': {'eventlet_hub': 'epolls', 'message': 'hi'}}
        wsgi = self.read(store, 'wsgi')
        lines = list(wsgi.lines())
        self.assertIn('  eventlet_hub = poll  # from [brim], ignored, as '
                      'brim has no use for it', lines)
        self.assertIn('  log_auth_tokens = yes  # ignored, as brim has no '
                      'use for it', lines)
        self.assertEqual(self.read(store, 'tcp')._passed, ('message',))
        # Unset, they are not shown at all.
        self.assertNotIn('eventlet_hub', ''.join(self.read({}, 'udp')
                                                 .lines()))

    def test_bad_values_keep_their_messages(self):
        for section, option, value, message in (
                ('wsgi', 'port', 'abc', "Configuration value [wsgi] port of "
                 "'abc' cannot be converted to int."),
                ('wsgi', 'port', '70000',
                 '[wsgi] port 70000 is not between 0 and 65535.'),
                ('wsgi', 'workers', '0', '[wsgi] workers must be at least 1.'),
                ('tcp', 'max_requests', '-1',
                 '[tcp] max_requests must be at least 0.'),
                ('wsgi', 'worker_timeout', '1',
                 '[wsgi] worker_timeout must be 0 (off) or at least 2 '
                 'seconds: workers beat once a second.'),
                ('wsgi', 'client_timeout', 'soon', "Configuration value "
                 "[wsgi] client_timeout of 'soon' cannot be converted to "
                 "float."),
                ('wsgi', 'log_headers', 'maybe', "Configuration value "
                 "[wsgi] log_headers of 'maybe' cannot be converted to "
                 "boolean."),
                ('wsgi', 'count_status_codes', '404 x', "Configuration value "
                 "[wsgi] count_status_codes of '404 x' cannot be converted "
                 "to a list of ints."),
                ('brim', 'umask', '9', "Configuration value [brim] umask of "
                 "'9' cannot be converted to an octal mask."),
                ('wsgi', 'log_format', 'xml',
                 "[wsgi] log_format 'xml' is not text or json."),
                ('daemons', 'log_level', 'LOUD',
                 "[daemons] log_level 'LOUD' is not one of DEBUG, INFO, "
                 "NOTICE, WARNING, ERROR, CRITICAL."),
                ('brim', 'log_facility', 'LOCAL9', "[brim] log_facility "
                 "'LOCAL9' is not a syslog facility such as LOCAL0.")):
            self.assertEqual(self.refusal({section: {option: value}},
                                          section), message)
        # A default from [brim] is judged where it is written.
        self.assertEqual(self.refusal({'brim': {'backlog': '0'}}, 'wsgi'),
                         '[brim] backlog must be at least 1.')

    def test_settings_convert_derive_and_stay_put(self):
        settings = self.read({'wsgi': {
            'max_request_line': '100', 'max_header_line': '50',
            'max_header_count': '3', 'count_status_codes': '418',
            'log_headers': 'yes', 'apps': 'a b'}}, 'wsgi')
        limits = brim._HTTPLimits.of(settings)
        self.assertEqual((limits.max_request_line, limits.max_head),
                         (100, 100 + 4 + 3 * (50 + 2)))
        self.assertEqual(settings.count_status_codes, (418,))
        self.assertIs(settings.log_headers, True)
        self.assertEqual(settings.apps, ('a', 'b'))
        self.assertIs(settings.dumps, json.dumps)
        self.assertIsNone(settings.tls)
        with self.assertRaises(AttributeError):
            settings.port = 8080
        with self.assertRaises(AttributeError):
            del settings.port
        self.assertEqual(settings.port, 80)
        brim_settings = self.read({'brim': {
            'umask': '027', 'pythonpath': ' lib ,, /opt/app ',
            'pid_file': '~/x.pid'}}, 'brim')
        self.assertEqual(brim_settings.umask, 0o027)
        self.assertEqual(brim_settings.pythonpath, ('lib', '/opt/app'))
        self.assertEqual(brim_settings.pid_file,
                         os.path.expanduser('~/x.pid'))
        self.assertIn('  umask = 0027', list(brim_settings.lines()))
        # The subserver keeps its settings, not a copy of each.
        subserver = self.subserver({'wsgi': {'max_body': '7'}}, 'wsgi')
        self.assertEqual(subserver.settings.max_body, 7)
        self.assertFalse(hasattr(subserver, 'max_body'))
        # Apps of the original read these from env['brim'].
        self.assertIs(subserver.json_loads, json.loads)
        with self.assertRaises(AttributeError):
            subserver.settings.max_body = 8

    def test_readme_lists_every_option_of_the_table(self):
        with open(os.path.join(HERE, 'README')) as fp:
            lines = fp.read().splitlines()
        start = lines.index('    option                 sections'
                            '                          default') + 1
        documented = {}
        for line in lines[start:lines.index('', start)]:
            name, sections, default = re.split(r'\s{2,}', line.strip())
            documented[name] = (sections, default)
        table = {}
        for option in brim._OPTIONS:
            kinds = [k for k in ('brim', 'wsgi', 'tcp', 'udp', 'daemons')
                     if k in option.kinds]
            shown = option.show(option.default)
            if option.ignored:
                shown = 'ignored'
            table[option.name] = (
                ' '.join(kinds) + (' (brim)' if option.from_brim else ''),
                '-' if shown == '(not set)' else shown)
        self.assertEqual(sorted(documented), sorted(table))
        self.assertEqual(documented, table)

    def test_sample_conf_shows_every_option(self):
        with open(SAMPLE) as fp:
            sample = fp.read()
        shown = set(re.findall(r'^#? ?([a-z_]+) = ', sample, re.M))
        self.assertEqual([o.name for o in brim._OPTIONS
                          if o.name not in shown and not o.ignored], [])
        for option in brim._OPTIONS:
            if option.ignored:
                self.assertIn(option.name, sample)
        # Every option it sets in brim's sections is brim's.
        conf = brim.read_conf([SAMPLE], explicit=True)
        for section in ('brim', 'wsgi'):
            brim._read_settings(conf, section, section)


class TestConfCommandLine(BrimTestCase):
    """Configuration errors and defaults as seen from ``start``."""

    def assert_failed_start(self, expected_err):
        code, out, err = self.brim('start')
        self.assertEqual(code, 1, (out, err))
        self.assertEqual(err, expected_err)
        self.assertFalse(os.path.exists(self.pid_file))
        return out, err

    def test_bad_int_port(self):
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = abc
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''')
        before = set(children_of(os.getpid()))
        self.assert_failed_start("Configuration value [wsgi] port of 'abc' "
                                 "cannot be converted to int.\n")
        # Nothing was left running: no new process in our tree.
        leftover = [p for p in set(children_of(os.getpid())) - before
                    if pid_alive(p)]
        self.assertEqual(leftover, [])

    def test_percent_in_values_is_plain(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            path = /100%%
            ''' % port)
        self.start()
        status, _h, body = self.http(port, 'POST', '/100%25', b'pct')
        self.assertEqual((status, body), (200, b'pct'))

    def test_additional_confs_includes_another_file(self):
        port = free_port()
        extra = os.path.join(self.tmp, 'extra.conf')
        with open(extra, 'w') as fp:
            fp.write('[echo]\ncall = brim.wsgi_echo.WSGIEcho\n'
                     'path = /from-extra\n')
        self.write_conf('''
            [brim]
            additional_confs = %s

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo
            ''' % (extra, port))
        self.start()
        self.echo_ok(port, '/from-extra')
        self.assertEqual(self.http(port, 'POST', '/echo', b'x')[0], 404)

    def test_missing_conf_file(self):
        missing = os.path.join(self.tmp, 'missing.conf')
        code, out, err = self.brim('start', conf=missing)
        self.assertEqual(code, 1)
        self.assertEqual(err, 'Configuration file %s was not found.\n'
                         % missing)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_no_configuration_at_all(self):
        if os.path.exists('/etc/brimd.conf'):
            self.skipTest('/etc/brimd.conf exists on this machine')
        home = os.path.join(self.tmp, 'home')
        os.mkdir(home)
        env = dict(self.env, HOME=home)
        code, out, err = run([sys.executable, BRIM, '-p', self.pid_file,
                              'start'], cwd=self.tmp, env=env)
        self.assertEqual(code, 1, out)
        self.assertEqual(err, 'No configuration found: there is no '
                         '/etc/brimd.conf or %s/.brimd.conf; name a file with '
                         '-c CONF.\n' % home)
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertEqual(os.listdir(home), [])

    def test_call_that_does_not_import(self):
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = broken

            [broken]
            call = nosuchmodule_xyz.Thing
            ''' % free_port())
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith('[broken] '), err)
        self.assertIn('nosuchmodule_xyz.Thing', err)
        self.assertEqual(err.count('\n'), 1, err)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_call_attribute_missing(self):
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = broken

            [broken]
            call = mywsgi.NoSuchClass
            ''' % free_port())
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith('[broken] '), err)
        self.assertIn('mywsgi.NoSuchClass', err)

    def test_brim_section_gives_defaults(self):
        port = free_port()
        self.write_conf('''
            [brim]
            workers = 2
            ip = 127.0.0.1

            [wsgi]
            port = %d
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % port)
        pid = self.start()
        self.assertEqual(listening_addresses(port), ['127.0.0.1'])
        self.assertEqual(len(live_children_of(pid)), 2)
        stats = self.stats(port)
        self.assertIn('0', stats['wsgi'])
        self.assertIn('1', stats['wsgi'])
        self.assertNotIn('2', stats['wsgi'])

    def test_workers_zero_is_refused(self):
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = 0
            ''' % free_port())
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertEqual(err, '[wsgi] workers must be at least 1.\n')
        self.assertFalse(os.path.exists(self.pid_file))

    def test_section_overrides_brim_defaults(self):
        port = free_port()
        self.write_conf('''
            [brim]
            workers = 3
            ip = 127.0.0.1

            [wsgi]
            port = %d
            workers = 1
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % port)
        pid = self.start()
        self.assertEqual(len(live_children_of(pid)), 1)
        self.assertEqual(sorted(k for k in self.stats(port)['wsgi']
                                if k.isdigit()), ['0'])


class TestSettingsCommandLine(BrimTestCase):
    """Unknown options and check's settings, through the command line."""

    def test_misspelt_port_stops_check_and_start(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            prot = %d
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''' % port)
        line = "[wsgi] unknown option 'prot' (did you mean 'port'?)\n"
        self.assertEqual(self.brim('check'), (1, '', line))
        self.assertEqual(self.brim('start'), (1, '', line))
        self.assertEqual(self.brim('restart'), (1, '', line))
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertTrue(connect_refused(port))
        self.assertTrue(connect_refused(80))

    def test_check_prints_the_settings_and_handler_options(self):
        wsgi_port, tcp_port = free_port(), free_port()
        self.write_conf('''
            [brim]
            workers = 2
            graceful_timeout = 5

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [tcp]
            ip = 127.0.0.1
            port = %d
            workers = 1
            call = mytcp.HelloWorld
            message = hi

            [deamons]
            daemons = sample

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (wsgi_port, tcp_port))
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        lines = out.splitlines()
        self.assertEqual(lines[-1], 'configuration OK')
        # A misspelt section, and an app no apps list names.
        self.assertEqual(lines.pop(-2), 'sections brim does not read (an '
                         'app may): [deamons], [stats]')
        sections = {}
        for line in lines[:-1]:
            if line.startswith('['):
                section = sections.setdefault(line.split(']')[0][1:], [])
            section.append(line)
        self.assertEqual(sorted(sections), ['brim', 'tcp', 'wsgi'])
        for name, kind in (('brim', 'brim'), ('wsgi', 'wsgi'),
                           ('tcp', 'tcp')):
            names = [line.split()[0] for line in sections[name][1:]
                     if ' = ' in line]
            # Every option of the section's kind; the original's ignored
            # ones only when set.
            self.assertEqual(names, [o.name for o in brim._options_of(kind)
                                     if kind in o.kinds and not o.ignored],
                             name)
        self.assertEqual(sections['wsgi'][0], '[wsgi] wsgi on 127.0.0.1:%d '
                         '(free to bind), 2 workers (at most 8)' % wsgi_port)
        self.assertIn('  workers = 2  # from [brim]', sections['wsgi'])
        self.assertIn('  port = %d' % wsgi_port, sections['wsgi'])
        self.assertIn('  max_body = (not set)  # default', sections['wsgi'])
        self.assertIn('  workers = 1', sections['tcp'])
        self.assertIn('  graceful_timeout = 5', sections['brim'])
        self.assertIn('  log_file = %s' % self.log_file, sections['brim'])
        self.assertEqual(sections['tcp'][-1],
                         '  passed to the handler: message')

    def test_stop_and_status_work_with_a_conf_that_no_longer_checks(self):
        port = free_port()
        self.write_conf('''
            [brim]
            pid_file = %s

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''' % (self.pid_file, port))
        pid = self.start()
        with open(self.conf_path) as fp:
            text = fp.read()
        with open(self.conf_path, 'w') as fp:
            fp.write(text.replace('[brim]\n', '[brim]\nuser_name = x\n'))
        line = "[brim] unknown option 'user_name' (did you mean 'user'?)\n"
        self.assertEqual(self.brim('check'), (1, '', line))
        # restart refuses it too, and the running brimd goes on serving.
        self.assertEqual(self.brim('restart'), (1, '', line))
        self.assertEqual(self.read_pid(), pid)
        self.echo_ok(port)
        # Without -p: the pid file is [brim]'s.
        command = [sys.executable, BRIM, '-c', self.conf_path]
        code, out, err = run(command + ['status'], cwd=self.tmp,
                             env=self.env)
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % pid), err)
        self.assertEqual(run(command + ['stop'], cwd=self.tmp,
                             env=self.env)[0], 0)
        self.assert_gone([pid])


# ---------------------------------------------------------------------------
# 2. Commands
# ---------------------------------------------------------------------------

ECHO_CONF = '''
[wsgi]
ip = 127.0.0.1
port = %(port)d
workers = %(workers)d
apps = misc hello echo stats
%(wsgi_extra)s
[hello]
call = mywsgi.HelloWorld
path = /here

[misc]
call = myapps.Misc
dir = %(dir)s

[echo]
call = brim.wsgi_echo.WSGIEcho

[stats]
call = brim.wsgi_stats.WSGIStats
'''


class EchoTestCase(BrimTestCase):
    """A BrimTestCase with a helper for the common echo/stats conf."""

    def echo_conf(self, workers=1, wsgi_extra='', brim_extra='', extra=''):
        """The echo conf; ``brim_extra`` lines go in [brim], ``extra`` is
        more sections."""
        self.port = free_port()
        text = ECHO_CONF % {'port': self.port, 'workers': workers,
                            'dir': self.tmp, 'wsgi_extra': wsgi_extra}
        if brim_extra:
            text = '[brim]\n%s\n%s' % (brim_extra, text)
        return self.write_conf(text + textwrap.dedent(extra))


class TestCommands(EchoTestCase):
    """start, stop, status, shutdown, restart and the other commands."""

    def test_start_serves_at_once(self):
        self.echo_conf()
        pid = self.start()
        # No waiting: the first request right after start must work.
        self.echo_ok(self.port)
        self.assertEqual(self.read_pid(), pid)

    def test_start_twice(self):
        self.echo_conf()
        pid = self.start()
        code, out, err = self.brim('start')
        self.assertEqual((code, out, err), (0, '%d already running\n' % pid,
                                            ''))
        self.assertEqual(self.read_pid(), pid)
        self.echo_ok(self.port)

    def test_status_running(self):
        self.echo_conf(workers=2)
        pid = self.start()
        for _ in range(3):
            self.echo_ok(self.port)
        code, out, err = self.brim('status')
        lines = out.splitlines()
        self.assertEqual((code, lines[0], err), (0, '%d is running' % pid, ''))
        self.assertRegex(lines[1], r'^  daemon, up \d+s, restarted in place '
                         r'0 times$')
        self.assertEqual(lines[2], '  [wsgi] 127.0.0.1:%d' % self.port)
        self.assertEqual(lines[3], '    2 of 2 workers running (workers = 2, '
                                   'at most 8)')
        found = re.findall(r'^    worker ([01]): pid (\d+), idle, up \d+s, '
                           r'served (\d+), restarts 0$', '\n'.join(lines[4:]),
                           re.M)
        self.assertEqual(sorted(int(p) for _, p, _ in found),
                         sorted(live_children_of(pid)), out)
        self.assertEqual(sum(int(n) for _, _, n in found), 3, out)
        # A replaced worker shows its restart and why the old one ended.
        victim = int(found[0][1])
        os.kill(victim, signal.SIGKILL)

        def restarted():
            out = self.brim('status')[1]
            return out if 'worker %s: pid' % found[0][0] in out and \
                'restarts 1, last exit: killed by signal SIGKILL after' \
                in out and str(victim) not in out else None
        wait_until(restarted, timeout=10)

    def test_status_not_running(self):
        self.echo_conf()
        code, out, err = self.brim('status')
        self.assertEqual((code, out, err), (3, 'not running\n', ''))

    def test_status_stale_pid_file(self):
        self.echo_conf()
        dead = popen([sys.executable, '-c', 'pass'])
        dead.wait()
        _protected.discard(dead.pid)
        self.assertFalse(pid_alive(dead.pid))
        with open(self.pid_file, 'w') as fp:
            fp.write('%d\n' % dead.pid)
        code, out, err = self.brim('status')
        self.assertEqual((code, out, err),
                         (1, '%d is not running\n' % dead.pid, ''))

    def test_status_after_stop(self):
        self.echo_conf()
        self.start()
        self.stop()
        code, out, err = self.brim('status')
        self.assertEqual((code, out), (3, 'not running\n'))

    def test_stop_leaves_nothing(self):
        self.echo_conf(workers=2)
        pid = self.start()
        workers = live_children_of(pid)
        self.assertEqual(len(workers), 2)
        self.echo_ok(self.port)
        code, out, err = self.brim('stop')
        self.assertEqual((code, err), (0, ''))
        self.assertFalse(pid_alive(pid), 'main process still running')
        self.assert_gone(workers)
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertTrue(connect_refused(self.port))

    def test_stop_kills_a_worker_deaf_to_sigterm(self):
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = 2
            apps = deaf echo

            [deaf]
            call = myapps.IgnoresTerm

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''' % self.port)
        pid = self.start()
        workers = live_children_of(pid)
        self.echo_ok(self.port)
        started = time.monotonic()
        code, out, err = self.brim('stop')
        self.assertEqual((code, err), (0, ''), self.log_text()[-4000:])
        # 5 s for SIGTERM, then SIGKILL: well inside stop's 15 s
        self.assertLess(time.monotonic() - started, 12)
        self.assert_gone([pid] + workers)
        self.assertIn('killing 2 workers that did not exit in 5s',
                      self.log_text())

    def test_stop_and_status_ignore_unrelated_pid(self):
        self.echo_conf()
        other = popen([sys.executable, '-c', 'import time; time.sleep(60)'])

        def reap():
            other.kill()
            other.wait(10)
            _protected.discard(other.pid)
        self.addCleanup(reap)
        with open(self.pid_file, 'w') as fp:
            fp.write('%d\n' % other.pid)
        code, out, err = self.brim('status')
        self.assertEqual((code, out), (1, '%d is not running\n' % other.pid))
        code, out, err = self.brim('stop')
        self.assertEqual(code, 0)
        self.assertIsNone(other.poll(), 'stop killed a process that is not '
                          'brimd')
        self.assertTrue(pid_alive(other.pid))
        # and start is not fooled into "already running"
        pid = self.start()
        self.assertNotEqual(pid, other.pid)
        self.echo_ok(self.port)

    def test_start_on_busy_port_fails(self):
        self.echo_conf(wsgi_extra='listen_retry = 0.2\n')
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(('127.0.0.1', self.port))
        holder.listen(1)
        code, out, err = self.brim('start')
        self.assertEqual(code, 1, out)
        # What it waits for, then the one-line reason it gave up.
        notice, failure = err.splitlines(True)
        self.assertEqual(notice, '[wsgi] 127.0.0.1:%d is in use; retrying '
                         'for 0.2s (listen_retry)\n' % self.port)
        self.assertTrue(failure.startswith('[wsgi] could not bind '), err)
        self.assertIn(str(self.port), failure)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_stop_when_not_running(self):
        self.echo_conf()
        code, out, err = self.brim('stop')
        self.assertEqual((code, err), (0, ''))
        self.assertIn('not running', out)

    def test_shutdown_finishes_in_flight_request(self):
        self.echo_conf()
        pid = self.start()
        workers = live_children_of(pid)
        result = {}

        def slow_request():
            try:
                result['response'] = self.http(self.port, 'GET',
                                               '/slow?2.5', timeout=20)
            except Exception as err:
                result['error'] = err

        client = threading.Thread(target=slow_request)
        client.start()
        self.addCleanup(client.join, 30)
        marker = os.path.join(self.tmp, 'slow-started')
        wait_until(lambda: os.path.exists(marker), timeout=10)
        shutdown = popen([sys.executable, BRIM, '-c', self.conf_path, '-p',
                          self.pid_file, 'shutdown'], cwd=self.tmp,
                         env=self.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        self.addCleanup(lambda: shutdown.poll() is None and shutdown.kill())
        # The port is released at once, while the slow request still runs.
        wait_until(lambda: connect_refused(self.port), timeout=10,
                   msg='port released')
        in_flight = client.is_alive()
        client.join(20)
        self.assertNotIn('error', result)
        status, _headers, body = result['response']
        self.assertEqual(status, 200)
        self.assertEqual(body, b'slow:' + b'x' * 5000 + b':done')
        out, err = shutdown.communicate(timeout=30)
        _protected.discard(shutdown.pid)
        self.assertEqual((shutdown.returncode, err), (0, b''))
        self.assertTrue(in_flight, 'the port was held until the request '
                        'finished')
        self.assert_gone([pid] + workers)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_restart_keeps_serving_and_changes_pid(self):
        self.echo_conf(workers=2)
        old_pid = self.start()
        old_workers = live_children_of(old_pid)
        stop = threading.Event()
        results = []

        def hammer():
            # Until told to stop; the cap only bounds a runaway test.
            deadline = time.monotonic() + 60
            while not stop.is_set() and len(results) < 20000 and \
                    time.monotonic() < deadline:
                try:
                    status, _h, body = self.http(self.port, 'POST', '/echo',
                                                 b'Just a test.', timeout=10)
                    results.append((status, body))
                except Exception as err:
                    results.append(('error', repr(err)))

        clients = [threading.Thread(target=hammer) for _ in range(4)]
        for client in clients:
            client.start()
        self.addCleanup(stop.set)
        wait_until(lambda: len(results) >= 5)
        code, out, err = self.brim('restart')
        self.assertEqual((code, err), (0, ''), out)
        new_pid = self.read_pid()
        self.track(new_pid)
        self.assertNotEqual(new_pid, old_pid)
        self.assert_gone([old_pid] + old_workers, timeout=15)
        count = len(results)
        wait_until(lambda: len(results) >= count + 5,
                   msg='clients kept being answered after the restart')
        stop.set()
        for client in clients:
            client.join(15)
        errors = [r for r in results if r != (200, b'Just a test.')]
        self.assertEqual(errors, [], 'failed during restart (%d requests)'
                         % len(results))
        self.assertGreater(len(results), count)
        code, out, err = self.brim('status')
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % new_pid))

    def test_restart_with_broken_conf_keeps_old_server(self):
        self.echo_conf()
        pid = self.start()
        with open(self.conf_path) as fp:
            good = fp.read()
        with open(self.conf_path, 'w') as fp:
            fp.write(good.replace('workers = 1', 'workers = many'))
        code, out, err = self.brim('restart')
        self.assertEqual(code, 1)
        self.assertEqual(err, "Configuration value [wsgi] workers of 'many' "
                         "cannot be converted to int.\n")
        self.assertEqual(self.read_pid(), pid)
        self.assertTrue(pid_alive(pid))
        self.echo_ok(self.port)
        code, out, err = self.brim('status')
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % pid))

    def test_restart_when_not_running_starts(self):
        self.echo_conf()
        code, out, err = self.brim('restart')
        pid = self.read_pid()
        self.track(pid)
        self.assertEqual((code, err), (0, ''))
        self.assertTrue(pid_alive(pid))
        self.echo_ok(self.port)

    def test_version(self):
        code, out, err = run([sys.executable, BRIM, '-v'], cwd=self.tmp,
                             env=self.env)
        self.assertEqual(code, 0)
        self.assertIn(brim.__version__, out)
        self.assertRegex(out.strip(), r'\d+\.\d+')

    def test_help(self):
        code, out, err = run([sys.executable, BRIM, '-h'], cwd=self.tmp,
                             env=self.env)
        self.assertEqual(code, 0)
        for command in ('start', 'stop', 'shutdown', 'restart', 'status',
                        'no-daemon'):
            self.assertIn(command, out)

    def test_unknown_command(self):
        self.echo_conf()
        code, out, err = self.brim('frobnicate')
        self.assertEqual(code, 1)
        self.assertIn('frobnicate', err)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_no_daemon_foreground(self):
        self.echo_conf(workers=2)
        out_path = os.path.join(self.tmp, 'no-daemon.out')
        with open(out_path, 'wb') as out:
            proc = popen([sys.executable, BRIM, '-c', self.conf_path,
                          'no-daemon'], cwd=self.tmp, env=self.env,
                         stdout=out, stderr=subprocess.STDOUT)

        self.addCleanup(kill_process, proc)
        wait_until(lambda: proc.poll() is not None or
                   not connect_refused(self.port), timeout=10)
        self.assertIsNone(proc.poll(), 'no-daemon exited early')
        self.echo_ok(self.port)
        status, _h, body = self.http(self.port, 'GET', '/pid')
        self.assertEqual(int(body), proc.pid, 'no-daemon serves in-process')
        self.assertFalse(os.path.exists(self.pid_file))
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        _protected.discard(proc.pid)
        self.assertTrue(connect_refused(self.port))


def top_status(workers, target=None, name='wsgi'):
    """A ``status`` answer as brimd gives one, with ``workers``: a list of
    (label, pid, served, cpu_seconds, rss_bytes) and optional extras."""
    rows = []
    for label, pid, served, cpu, rss in workers:
        rows.append({'label': label, 'pid': pid,
                     'state': 'idle' if pid else 'down',
                     'uptime': 5.0 if pid else None, 'served': served,
                     'restarts': 0, 'last_exit': None, 'in_flight': 0,
                     'busy_seconds': 0.0, 'request': None,
                     'request_seconds': None, 'rss_bytes': rss,
                     'cpu_seconds': cpu})
    return {'pid': 100, 'uptime': 187, 'generation': 2, 'foreground': False,
            'subservers': [{'name': name, 'kind': 'wsgi',
                            'addresses': ['127.0.0.1:8901'],
                            'configured': '2..8',
                            'target': len(rows) if target is None else target,
                            'max_workers': 8, 'decision': None,
                            'workers': rows}]}


class TestTopInProcess(unittest.TestCase):
    """top's rates and table, from made-up status answers."""

    MB = 1048576

    def sample(self, *statuses_at):
        """The view of the last of (status, time) pairs added in turn."""
        sampler = brim._TopSampler()
        for status, now in statuses_at:
            view = sampler.add(status, now)
        return view

    def workers(self, view):
        return {w['label']: w for w in view['subservers'][0]['workers']}

    def test_rates_from_two_samples(self):
        view = self.sample(
            (top_status([('0', 11, 100, 1.0, 10 * self.MB),
                         ('1', 12, 7, 2.0, 20 * self.MB)]), 50.0),
            (top_status([('0', 11, 150, 1.5, 11 * self.MB),
                         ('1', 12, 7, 2.0, 20 * self.MB)]), 52.0))
        workers = self.workers(view)
        self.assertEqual((workers['0']['requests_per_second'],
                          workers['0']['cpu_percent']), (25.0, 25.0))
        self.assertEqual((workers['1']['requests_per_second'],
                          workers['1']['cpu_percent']), (0.0, 0.0))
        self.assertEqual(view['subservers'][0]['totals'], {
            'running': 2, 'target': 2, 'requests_per_second': 25.0,
            'served': 157, 'rss_bytes': 31 * self.MB, 'cpu_percent': 25.0})
        # Everything brimd answered is still there, untouched.
        self.assertEqual(workers['0']['served'], 150)
        self.assertEqual(view['generation'], 2)

    def test_first_sample_has_no_rates(self):
        view = self.sample((top_status([('0', 11, 100, 1.0, 0)]), 50.0))
        worker = self.workers(view)['0']
        self.assertEqual((worker['requests_per_second'],
                          worker['cpu_percent']), (None, None))
        self.assertIn('  total        1/1               -      100     0.0'
                      '      -', brim._TopTable().lines(view))

    def test_a_new_pid_resets_the_rate(self):
        view = self.sample(
            (top_status([('0', 11, 100, 9.0, 0), ('1', 12, 5, 1.0, 0)]), 0.0),
            (top_status([('0', 13, 3, 0.2, 0), ('1', 12, 9, 1.5, 0)]), 1.0))
        workers = self.workers(view)
        self.assertEqual((workers['0']['requests_per_second'],
                          workers['0']['cpu_percent']), (None, None))
        self.assertEqual((workers['1']['requests_per_second'],
                          workers['1']['cpu_percent']), (4.0, 50.0))
        # A worker down is neither running nor rated.
        view = self.sample(
            (top_status([('0', 11, 1, 1.0, 0)]), 0.0),
            (top_status([('0', None, 1, None, None)], target=1), 1.0))
        self.assertEqual(view['subservers'][0]['totals']['running'], 0)
        self.assertIsNone(self.workers(view)['0']['requests_per_second'])

    def test_sort_order_cycles(self):
        MB = self.MB
        view = self.sample(
            (top_status([('2', 21, 0, 0.0, 0), ('10', 30, 0, 0.0, 0),
                         ('1', 20, 0, 0.0, 0)]), 0.0),
            (top_status([('2', 21, 5, 0.1, 3 * MB),
                         ('10', 30, 1, 0.9, 2 * MB),
                         ('1', 20, 9, 0.5, 1 * MB)]), 1.0))
        table = brim._TopTable(live=True)
        orders = []
        for _ in range(5):
            rows = [line.split()[0] for line in table.lines(view)
                    if re.match(r'  \d+ ', line)]
            sort = re.search(r'sorted by (\S+)', table.lines(view)[0])
            orders.append((sort.group(1), rows))
            table.next_sort()
        self.assertEqual(orders, [('label', ['1', '2', '10']),
                                  ('req/s', ['1', '2', '10']),
                                  ('cpu', ['10', '1', '2']),
                                  ('rss', ['2', '10', '1']),
                                  ('label', ['1', '2', '10'])])

    def test_the_table(self):
        status = top_status([('0', 11, 100, 1.0, 10 * self.MB),
                             ('1', None, 7, None, None)], target=2)
        busy = status['subservers'][0]['workers'][0]
        busy.update(state='busy', in_flight=1, request_seconds=2.25,
                    request='tx123 GET /slow/thing')
        lines = brim._TopTable().lines(self.sample((status, 0.0)))
        self.assertEqual(lines, [
            'brimd 100, daemon, up 3m07s, restarted in place 2 times',
            '',
            '[wsgi] 127.0.0.1:8901 (workers = 2..8)',
            '  WORKER       PID STATE     REQ/S   SERVED  RSS MB   CPU%'
            '   UPTIME  RESTARTS',
            '  0             11 busy          -      100    10.0      -'
            '       5s         0',
            '      in flight 2.2s: tx123 GET /slow/thing',
            '  1              - down          -        7       -      -'
            '        -         0',
            '  total        1/2               -      107    10.0      -'])

    def test_lines_are_cut_to_the_width(self):
        status = top_status([('0', 11, 100, 1.0, 0)])
        status['subservers'][0]['workers'][0]['request'] = 'x' * 300
        view = self.sample((status, 0.0))
        whole = brim._TopTable(live=True).lines(view)
        self.assertGreater(max(map(len, whole)), 300)
        for width in (1, 20, 79):
            cut = brim._TopTable(live=True).lines(view, width)
            self.assertEqual(cut, [line[:width] for line in whole])
            self.assertLessEqual(max(map(len, cut)), width)


class TestTop(EchoTestCase):
    """brimd top against a running brimd: on a terminal (a pseudo
    terminal, curses and plain ANSI), through a pipe, and as JSON."""

    #: How a frame drawn with plain ANSI codes (not curses) ends.
    ANSI_FRAME_END = '\x1b[K\x1b[J'

    def top_conf(self, workers=2):
        """Two workers serving mywait.Waits (/hold waits until the file
        "release" exists) before the echo app; returns the worker pids."""
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = %d
            apps = waits echo

            [waits]
            call = mywait.Waits
            dir = %s

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''' % (self.port, workers, self.tmp))
        main = self.start()
        return wait_until(lambda: len(live_children_of(main)) == workers and
                          sorted(live_children_of(main)))

    def top_in_pty(self, term='xterm', columns=160, rows=40):
        """brimd top in a pseudo terminal: (process, master fd)."""
        master, slave = pty.openpty()
        self.resize(master, columns, rows)
        self.addCleanup(os.close, master)
        proc = popen([sys.executable, BRIMD, '-c', self.conf_path,
                      '-p', self.pid_file, 'top'], cwd=self.tmp,
                     env=dict(self.env, TERM=term), stdin=slave,
                     stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.addCleanup(end_process, proc)
        self.screen = ''
        return proc, master

    def resize(self, master, columns, rows, proc=None):
        """Set the window size (and tell ``proc``, as a terminal tells its
        foreground process)."""
        fcntl.ioctl(master, termios.TIOCSWINSZ,
                    struct.pack('HHHH', rows, columns, 0, 0))
        if proc is not None:
            os.kill(proc.pid, signal.SIGWINCH)

    def read_screen(self, master, pattern, timeout=10):
        """Read what top draws until ``pattern`` (a regex, or a function
        of the text) shows in it."""
        deadline = time.monotonic() + timeout
        shows = pattern if callable(pattern) else (
            lambda screen: re.search(pattern, screen))
        while not shows(self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([master], [], [],
                                                   remaining)[0]:
                self.fail('%r not on the screen within %ss:\n%r' % (
                    pattern, timeout, self.screen[-3000:]))
            try:
                chunk = os.read(master, 65536)
            except OSError:     # EIO: top exited, the terminal closed
                chunk = b''
            if not chunk:
                self.fail('top ended before %r showed:\n%r' % (
                    pattern, self.screen[-3000:]))
            self.screen += chunk.decode('utf-8', 'replace')

    def frame_fits(self, columns, rows):
        """Whether the latest whole frame drawn with ANSI codes fits."""
        frames = self.screen.split('\x1b[H')[1:]
        frames = [f for f in frames if f.endswith(self.ANSI_FRAME_END)]
        lines = frames[-1].split('\n') if frames else ['x' * 999]
        widths = [len(re.sub(r'\x1b\[[KJ]|\r', '', line)) for line in lines]
        return len(lines) <= rows and max(widths) <= columns

    def pid_on_screen(self, pid):
        # Not inside an escape sequence (cursor moves have digits too).
        return r'(?<![\d;\[])%d(?!\d)' % pid

    def hold_a_request(self):
        """A request to /hold, in flight in a thread; its result list."""
        result = []
        thread = threading.Thread(target=lambda: result.append(
            self.http(self.port, 'GET', '/hold', timeout=30)))
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(self.release)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp, 'holding')),
                   msg='the /hold request reached the app')
        return thread, result

    def release(self):
        with open(os.path.join(self.tmp, 'release'), 'w'):
            pass

    def test_live_view_shows_workers_and_the_request_in_flight(self):
        pids = self.top_conf()
        proc, master = self.top_in_pty()
        self.read_screen(master, 'RESTARTS')
        # A window resized to narrower than a line (the header cut after
        # the pid) and 3 rows, then back: no crash.
        header = 'brimd %d' % self.read_pid()
        self.resize(master, len(header) + 1, 3, proc)
        self.read_screen(master, re.escape(header) + '[^,]')
        self.resize(master, 160, 40, proc)
        for pid in pids:
            self.read_screen(master, self.pid_on_screen(pid))
        self.read_screen(master, 'idle')
        thread, result = self.hold_a_request()
        self.read_screen(master, 'busy')
        self.read_screen(master, r'GET /hold')
        self.release()
        thread.join(30)
        self.assertEqual(result[0][0], 200)
        os.write(master, b's')
        self.read_screen(master, r'req/s')
        os.write(master, b'q')
        self.assertEqual(proc.wait(10), 0)
        self.assertNotIn(self.ANSI_FRAME_END, self.screen, 'not curses')

    def test_plain_ansi_when_curses_cannot_start_and_brimd_gone(self):
        pids = self.top_conf()
        proc, master = self.top_in_pty(term='brim-no-such-terminal',
                                       columns=60)
        self.read_screen(master, re.escape(self.ANSI_FRAME_END))
        for pid in pids:
            self.read_screen(master, self.pid_on_screen(pid))
        # Lines longer than the window are cut, never wrapped; a smaller
        # window gets fewer, shorter lines.
        self.assertTrue(self.frame_fits(60, 40))
        self.resize(master, 30, 5, proc)
        self.read_screen(master, lambda screen: self.frame_fits(30, 5))
        main = self.read_pid()
        self.stop()
        self.assertEqual(proc.wait(15), 1)
        self.read_screen(master, 'brimd %d is gone' % main)
        self.assertIn('\x1b[?1049l', self.screen)

    def test_one_snapshot_when_not_a_terminal(self):
        pids = self.top_conf()
        self.echo_ok(self.port)
        code, out, err = self.brim('top')
        self.assertEqual((code, err), (0, ''), out)
        self.assertRegex(out, r'^brimd %d, daemon, up \d+s, restarted in '
                         r'place 0 times\n' % self.read_pid())
        for pid in pids:
            self.assertRegex(out, r'\n  \d +%d idle +\d+\.\d +\d+ ' % pid)
        self.assertRegex(out, r'\n  total +2/2 +\d+\.\d +1 ')
        self.assertNotIn('\x1b', out)

    def test_json_snapshot(self):
        pids = self.top_conf()
        code, out, err = self.brim('top', '--json')
        self.assertEqual((code, err), (0, ''))
        view = json.loads(out)
        self.assertEqual(view['pid'], self.read_pid())
        [sub] = view['subservers']
        self.assertEqual(sorted(w['pid'] for w in sub['workers']), pids)
        for worker in sub['workers']:
            self.assertIsInstance(worker['requests_per_second'], float)
            self.assertIsInstance(worker['cpu_percent'], float)
        self.assertEqual(sub['totals']['running'], 2)

    def test_not_running_and_misuse(self):
        self.echo_conf()
        for args, needle in ((('top',), 'not running'),
                             (('top', '--json'), 'not running'),
                             (('top', 'now'), 'top takes no argument'),
                             (('status', '--json'), '--json is for top')):
            code, out, err = self.brim(*args)
            self.assertEqual((code, out, err.count('\n')), (1, '', 1), err)
            self.assertIn(needle, err)


# ---------------------------------------------------------------------------
# 3. The documentation's walk-throughs
# ---------------------------------------------------------------------------

class TestWSGIWalkThrough(BrimTestCase):
    """Docs 1.1, 1.2 and 1.6: echo, stats, multi-config, HelloWorld."""

    def test_wsgi_usage(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo stats

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % port)
        self.start()
        status, headers, body = self.http(port, 'POST', '/echo',
                                          b'Just a test.')
        self.assertEqual((status, body), (200, b'Just a test.'))
        self.assertEqual(headers['content-length'], '12')
        status, headers, body = self.http(port, 'GET', '/invalid')
        self.assertEqual((status, body), (404, b'404 Not Found\n'))
        self.assertEqual(headers['content-length'], '14')
        self.assertEqual(headers['content-type'], 'text/plain')
        stats = self.stats(port)
        self.assertIsInstance(stats['start_time'], int)
        self.assertLessEqual(abs(stats['start_time'] - time.time()), 60)
        self.assertIn('0', stats['wsgi'])
        self.assertEqual(stats['wsgi']['echo.requests'], 1)
        self.assertEqual(stats['wsgi']['status_404_count'], 1)
        self.assertEqual(stats['wsgi']['status_2xx_count'], 1)
        self.assertEqual(stats['wsgi']['request_count'], 2)
        self.assertIn('start_time', stats['wsgi']['0'])
        self.stop()

    def test_multi_configuration(self):
        port, port2 = free_port(), free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo stats

            [wsgi#alternate]
            ip = 127.0.0.1
            port = %d
            apps = echo2 stats

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats

            [echo2]
            call = brim.wsgi_echo.WSGIEcho
            path = /echo2
            ''' % (port, port2))
        self.start()
        self.echo_ok(port, '/echo')
        self.echo_ok(port2, '/echo2')
        self.assertEqual(self.http(port, 'POST', '/echo2', b'x')[0], 404)
        self.assertEqual(self.http(port2, 'POST', '/echo', b'x')[0], 404)
        for p in (port, port2):
            stats = self.stats(p)
            self.assertIn('wsgi', stats)
            self.assertIn('wsgi#alternate', stats)
            self.assertEqual(stats['wsgi']['echo.requests'], 1)
            self.assertEqual(stats['wsgi#alternate']['echo2.requests'], 1)

    def test_plain_helloworld(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = helloworld

            [helloworld]
            call = mywsgi.PlainHelloWorld
            ''' % port)
        self.start()
        status, headers, body = self.http(port, 'GET', '/helloworld')
        self.assertEqual((status, body), (200, b'Hello World!\n'))
        self.assertEqual(headers['content-length'], '13')
        self.assertIn('date', headers)

    def test_helloworld_parse_conf_error(self):
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = helloworld

            [helloworld]
            call = mywsgi.HelloWorld
            ''' % free_port())
        before = set(children_of(os.getpid()))
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertEqual(err, '[helloworld] you must configure a path to '
                         'serve.\n')
        self.assertFalse(os.path.exists(self.pid_file))
        leftover = [p for p in set(children_of(os.getpid())) - before
                    if pid_alive(p)]
        self.assertEqual(leftover, [])

    def test_helloworld_with_path(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = helloworld

            [helloworld]
            call = mywsgi.HelloWorld
            path = /here
            ''' % port)
        self.start()
        self.assertEqual(self.http(port, 'GET', '/here')[::2],
                         (200, b'Hello World!\n'))
        self.assertEqual(self.http(port, 'GET', '/helloworld')[0], 404)

    def test_helloworld_stats_two_workers(self):
        port, admin = free_port(), free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = helloworld stats
            workers = 2

            [wsgi#admin]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [helloworld]
            call = mywsgi.HelloWorld
            path = /here

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (port, admin))
        self.start()
        total = 200
        results = self.load(port, '/here', total, threads=8)
        self.assertEqual(len(results), total)
        self.assertEqual([r for r in results
                          if r != (200, b'Hello World!\n')], [])
        wsgi = self.stats(port)['wsgi']   # stats from the same chain work
        self.assertEqual(wsgi['helloworld.requests'], total)
        # request_count is counted once the answer is out: poll for it.
        wsgi = wait_until(lambda: (lambda s: s if s['request_count'] >=
                                   total + 1 else None)(
            self.stats(admin)['wsgi']))
        self.assertEqual(wsgi['helloworld.requests'], total)
        self.assertEqual(wsgi['0']['helloworld.requests'] +
                         wsgi['1']['helloworld.requests'], total)
        self.assertEqual(wsgi['request_count'], total + 1)
        self.assertEqual(wsgi['0']['request_count'] +
                         wsgi['1']['request_count'], total + 1)
        self.assertEqual(wsgi['status_2xx_count'], total + 1)
        self.assertGreater(wsgi['helloworld.last_called'], 0)
        self.assertEqual(wsgi['helloworld.last_called'],
                         max(wsgi['0']['helloworld.last_called'],
                             wsgi['1']['helloworld.last_called']))
        self.assertNotIn('2', wsgi)


class TestTCPWalkThrough(BrimTestCase):
    """Docs 1.3 and 1.9: TCPEcho, [tcp#alternate], TCP HelloWorld."""

    def test_tcp_echo(self):
        port = free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho
            ''' % port)
        self.start()
        self.assertEqual(tcp_exchange(port, b'Just a test.\n'),
                         b'Just a test.\n')

    def test_tcp_alternate(self):
        port, port2 = free_port(), free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho

            [tcp#alternate]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho
            ''' % (port, port2))
        self.start()
        self.assertEqual(tcp_exchange(port, b'Just a test.\n'),
                         b'Just a test.\n')
        self.assertEqual(tcp_exchange(port2, b'Just a test.\n'),
                         b'Just a test.\n')

    def test_tcp_helloworld_parse_conf_error(self):
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = mytcp.HelloWorld
            ''' % free_port())
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertEqual(err, '[tcp] you must configure a message to '
                         'serve.\n')
        self.assertFalse(os.path.exists(self.pid_file))

    def test_tcp_helloworld_stats_two_workers(self):
        port, web = free_port(), free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = mytcp.HelloWorld
            message = Hello, hello!
            workers = 2

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (port, web))
        self.start()
        self.assertEqual(tcp_exchange(port, b''), b'Hello, hello!\n')
        total = 120
        replies = []
        lock = threading.Lock()
        counter = itertools.count()

        def client():
            while True:
                with lock:
                    if next(counter) >= total - 1:
                        return
                try:
                    reply = tcp_exchange(port, b'')
                except Exception as err:
                    reply = repr(err)
                with lock:
                    replies.append(reply)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(replies, [b'Hello, hello!\n'] * (total - 1))
        # The handler counts after closing the socket: poll for the count.
        tcp = wait_until(lambda: (lambda s: s if s['connections'] >= total
                                  else None)(self.stats(web)['tcp']))
        self.assertEqual(tcp['connections'], total)
        self.assertEqual(tcp['0']['connections'] + tcp['1']['connections'],
                         total)
        self.assertGreater(tcp['last_called'], 0)
        self.assertEqual(self.stats(web)['tcp']['connections'], total)


class TestUDPWalkThrough(BrimTestCase):
    """Docs 1.4 and 1.10: UDPEcho, [udp#alternate], UDP HelloWorld."""

    def test_udp_echo(self):
        port = free_udp_port()
        self.write_conf('''
            [udp]
            ip = 127.0.0.1
            port = %d
            call = brim.udp_echo.UDPEcho
            ''' % port)
        self.start()
        self.assertEqual(udp_exchange(port, b'Just a test.\n'),
                         b'Just a test.\n')

    def test_udp_alternate(self):
        port, port2 = free_udp_port(), free_udp_port()
        self.write_conf('''
            [udp]
            ip = 127.0.0.1
            port = %d
            call = brim.udp_echo.UDPEcho

            [udp#alternate]
            ip = 127.0.0.1
            port = %d
            call = brim.udp_echo.UDPEcho
            ''' % (port, port2))
        self.start()
        self.assertEqual(udp_exchange(port, b'one\n'), b'one\n')
        self.assertEqual(udp_exchange(port2, b'two\n'), b'two\n')

    def test_udp_helloworld_parse_conf_error(self):
        self.write_conf('''
            [udp]
            ip = 127.0.0.1
            port = %d
            call = myudp.HelloWorld
            ''' % free_udp_port())
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertEqual(err, '[udp] you must configure a message to '
                         'serve.\n')
        self.assertFalse(os.path.exists(self.pid_file))

    def test_udp_helloworld_with_stats(self):
        port, web = free_udp_port(), free_port()
        self.write_conf('''
            [udp]
            ip = 127.0.0.1
            port = %d
            call = myudp.HelloWorld
            message = Hello, hello!

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (port, web))
        self.start()
        self.assertEqual(udp_exchange(port, b'test\n'), b'Hello, hello!\n')
        udp = self.stats(web)['udp']
        self.assertGreater(udp['last_called'], 0)
        self.assertEqual(udp['0']['last_called'], udp['last_called'])


class TestDaemonsWalkThrough(BrimTestCase):
    """Docs 1.5 and 1.11: DaemonSample and a daemon with stats."""

    def test_daemon_sample_logs(self):
        self.write_conf('''
            [daemons]
            daemons = sample

            [sample]
            call = brim.daemon_sample.DaemonSample
            interval = 0.2
            ''')
        pid = self.start()
        self.assertEqual(len(live_children_of(pid)), 1)
        self.wait_for_log(r'sample sample daemon alive: 3 iterations')

    def test_daemon_parse_conf_error(self):
        self.write_conf('''
            [daemons]
            daemons = helloworld

            [helloworld]
            call = mydaemon.HelloWorld
            ''')
        code, out, err = self.brim('start')
        self.assertEqual(code, 1)
        self.assertEqual(err, '[helloworld] you must configure a message to '
                         'log.\n')
        self.assertFalse(os.path.exists(self.pid_file))

    def test_daemon_stats(self):
        web = free_port()
        self.write_conf('''
            [daemons]
            daemons = helloworld

            [helloworld]
            call = mydaemon.HelloWorld
            message = Hello, hello!

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % web)
        self.start()
        self.wait_for_log(r'Hello, hello! 1$')
        daemons = wait_until(lambda: (lambda s: s if s.get(
            'helloworld', {}).get('last_logged') else None)(
            self.stats(web)['daemons']))
        self.assertLessEqual(abs(daemons['helloworld']['last_logged'] -
                                 time.time()), 60)
        self.assertNotIn('last_logged', daemons)   # 'daemon': no roll-up


# ---------------------------------------------------------------------------
# 4. Everything in one brimd
# ---------------------------------------------------------------------------

class TestEverythingAtOnce(BrimTestCase):
    """wsgi, wsgi#alt, tcp, udp and daemons served by one brimd."""

    def test_all_kinds_together(self):
        web, alt, tcp, udp = (free_port(), free_port(), free_port(),
                              free_udp_port())
        self.write_conf('''
            [brim]
            ip = 127.0.0.1

            [wsgi]
            port = %d
            workers = 2
            apps = echo stats

            [wsgi#alt]
            port = %d
            apps = echo2

            [tcp]
            port = %d
            call = brim.tcp_echo.TCPEcho

            [udp]
            port = %d
            call = brim.udp_echo.UDPEcho

            [daemons]
            daemons = sample

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [echo2]
            call = brim.wsgi_echo.WSGIEcho
            path = /echo2

            [stats]
            call = brim.wsgi_stats.WSGIStats

            [sample]
            call = brim.daemon_sample.DaemonSample
            interval = 0.2
            ''' % (web, alt, tcp, udp))
        pid = self.start()
        self.echo_ok(web, '/echo')
        self.echo_ok(alt, '/echo2')
        self.assertEqual(tcp_exchange(tcp, b'tcp data\n'), b'tcp data\n')
        self.assertEqual(udp_exchange(udp, b'udp data'), b'udp data')
        self.wait_for_log(r'sample sample daemon alive: 2 iterations')
        stats = self.stats(web)
        for name in ('wsgi', 'wsgi#alt', 'tcp', 'udp', 'daemons'):
            self.assertIn(name, stats)
        self.assertIn('sample', stats['daemons'])
        self.assertEqual(stats['tcp']['byte_count'], 9)
        self.assertEqual(stats['udp']['datagram_count'], 1)
        everything = descendants_of(pid)
        self.assertEqual(len(everything), 6, everything)   # 2+1+1+1+1
        self.stop()
        self.assert_gone([pid] + everything)
        self.assertFalse(os.path.exists(self.pid_file))
        for port in (web, alt, tcp):
            self.assertTrue(connect_refused(port))


# ---------------------------------------------------------------------------
# 5. Supervision
# ---------------------------------------------------------------------------

class TestSupervision(EchoTestCase):
    """Dead workers come back; crashing code is logged and contained."""

    def test_killed_worker_is_replaced(self):
        self.echo_conf()
        pid = self.start()
        [old] = live_children_of(pid)
        status, _h, body = self.http(self.port, 'GET', '/pid')
        self.assertEqual(int(body), old)
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: [p for p in live_children_of(pid)
                                  if p != old], timeout=10)
        self.assertEqual(len(new), 1)
        body = wait_until(lambda: self.http(self.port, 'GET', '/pid')[2],
                          timeout=10)
        self.assertEqual(int(body), new[0])
        self.echo_ok(self.port)
        lines = self.wait_for_log(r'\b%d\b.*SIGKILL' % old)
        self.assertIn('[wsgi]', lines[0])
        self.assertTrue(pid_alive(pid))

    def test_crashing_daemon_is_throttled(self):
        starts = os.path.join(self.tmp, 'starts')
        self.write_conf('''
            [daemons]
            daemons = crasher

            [crasher]
            call = mydaemon.Crasher
            path = %s
            delay = 0.5
            ''' % starts)
        # (delay: crash 0.5s after starting, so this test does not depend
        # on test_daemon_crashing_after_start_does_not_fail_start's race)
        self.start()
        began = time.monotonic()

        def count():
            try:
                with open(starts) as fp:
                    return fp.read().count('start')
            except OSError:
                return 0
        wait_until(lambda: count() >= 2, timeout=5,
                   msg='the crashed daemon was restarted')
        # Observe a 3 second window from start (polling, not sleeping).
        while time.monotonic() - began < 3.0:
            time.sleep(0.05)
        # Each run lives 0.5s; backoff 1s then 2s gives starts at about
        # 0, 1.5 and 4.0s: 2 in the window.  One restart a second without
        # backoff would give 4 (0, 1, 2, 3), and none at all 6.
        self.assertLessEqual(count(), 3, 'restarts are not throttled')
        self.assertGreaterEqual(count(), 2)
        self.wait_for_log(r'crasher-marker')
        self.wait_for_log(r'\[daemons\] daemon crasher .*exit status')

    def test_daemon_crashing_after_start_does_not_fail_start(self):
        """A daemon that crashes once running is restarted, not fatal.

        Its constructor succeeded and it beat its heartbeat; only then did
        it crash.  A WSGI worker that takes a moment to build its apps makes
        brimd's readiness wait still be running when that happens.
        """
        starts = os.path.join(self.tmp, 'starts')
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = slow echo

            [slow]
            call = myapps.SlowInit
            delay = 0.5

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [daemons]
            daemons = crasher

            [crasher]
            call = mydaemon.Crasher
            path = %s
            ''' % (port, starts))
        code, out, err = self.brim('start')
        self.track(self.read_pid())
        self.assertEqual((code, err), (0, ''), 'start failed because a '
                         'daemon crashed after it had started')
        self.echo_ok(port)

        def count():
            with open(starts) as fp:
                return fp.read().count('start')
        wait_until(lambda: count() >= 2, timeout=5)

    def test_tcp_handler_raises(self):
        port = free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = mytcp.Raiser
            ''' % port)
        pid = self.start()
        [worker] = live_children_of(pid)
        self.assertEqual(tcp_exchange(port, b'boom'), b'')
        self.wait_for_log(r'ValueError: tcp-boom-marker')
        self.assertIn('Traceback (most recent call last)', self.log_text())
        self.assertEqual(tcp_exchange(port, b'hi'), b'ok:hi')
        self.assertEqual(live_children_of(pid), [worker])

    def test_udp_handler_raises(self):
        port = free_udp_port()
        self.write_conf('''
            [udp]
            ip = 127.0.0.1
            port = %d
            call = myudp.Raiser
            ''' % port)
        pid = self.start()
        [worker] = live_children_of(pid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.sendto(b'boom', ('127.0.0.1', port))
        self.wait_for_log(r'ValueError: udp-boom-marker')
        self.assertEqual(udp_exchange(port, b'next'), b'ok:next')
        self.assertEqual(live_children_of(pid), [worker])

    def test_wsgi_app_raises(self):
        self.echo_conf()
        pid = self.start()
        [worker] = live_children_of(pid)
        status, _headers, body = self.http(self.port, 'GET', '/raise')
        self.assertEqual(status, 500)
        match = re.search(rb'txn (\S+)', body)
        self.assertIsNotNone(match, body)
        txn = match.group(1).decode()
        lines = self.wait_for_log(r'app-raised-marker')
        self.assertTrue(any(txn in line for line in lines), lines)
        self.assertIn('Traceback (most recent call last)', self.log_text())
        self.assertIn('ValueError: app-raised-marker', self.log_text())
        self.echo_ok(self.port)
        self.assertEqual(live_children_of(pid), [worker])
        request = self.wait_for_log(r' GET /raise HTTP/1.1 500 ')
        self.assertEqual(parse_request_line(request[0])['txn'], txn)

    def test_wsgi_app_returns_str(self):
        self.echo_conf()
        self.start()
        status, _headers, body = self.http(self.port, 'GET', '/str')
        self.assertEqual(status, 500)
        self.assertNotIn(b'a str body', body)
        lines = self.wait_for_log(r'/str.*bytes')
        self.assertIn('str', lines[0].split('/str', 1)[1])
        self.echo_ok(self.port)


class _FakeClock(object):
    """A clock a test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class _FakeBucket(object):
    """What the supervisor reads of a worker's stats bucket."""

    def __init__(self):
        self.beat = 0.0
        self.latest = (0.0, '')
        self.values = {}

    def reset(self):
        self.values.clear()

    def set(self, name, value):
        self.values[name] = value

    def get(self, name):
        return self.values.get(name, 0)

    def clear_in_flight(self):
        self.values['_in_flight'] = 0

    def heartbeat(self):
        return self.beat

    def latest_request(self):
        return self.latest

    def served(self):
        return 0


class _SupervisedSubserver(object):
    """What _Supervisor asks of a subserver."""

    def __init__(self, worker_timeout=0.0):
        self.settings = types.SimpleNamespace(worker_timeout=worker_timeout)

    def worker_label(self, index):
        return '[fake] worker %d' % index


class _NotedLog(object):
    """A logger that keeps its lines as (level, text)."""

    def __init__(self):
        self.lines = []

    def _note(level):
        def note(self, msg, *args):
            self.lines.append((level, msg % args))
        return note

    error, warning, info = _note('error'), _note('warning'), _note('info')
    del _note

    def texts(self, level):
        return [text for noted, text in self.lines if noted == level]


class TestSupervisorInProcess(unittest.TestCase):
    """The supervisor's schedule against a fake clock and fake pids: no
    process is started and nothing sleeps."""

    def setUp(self):
        self.clock = _FakeClock()
        self.wall = _FakeClock(5000.0)
        self.pids = itertools.count(100)
        self.forked = []        # (worker, ready_fd)
        self.killed = []        # (pid, signum)
        self.exited = []        # (pid, status) for the next reap
        self.log = _NotedLog()

    def supervisor(self, slots=1, worker_timeout=0.0, graceful=30.0):
        subserver = _SupervisedSubserver(worker_timeout)
        workers = [brim._WorkerSlot(subserver, index, _FakeBucket())
                   for index in range(slots)]
        for worker in workers:
            worker.wanted = True
        return brim._Supervisor(workers, self.log, graceful, self.fork,
                                kill=self.kill, reap=self.reap,
                                clock=self.clock, wall_clock=self.wall)

    def fork(self, worker, ready_fd):
        self.forked.append((worker, ready_fd))
        return next(self.pids)

    def kill(self, pid, signum):
        self.killed.append((pid, signum))

    def reap(self):
        exited, self.exited = self.exited, []
        return exited

    def die(self, supervisor, pid, status=1 << 8):
        """``pid`` exits (status 1 unless told) and is reaped."""
        self.exited.append((pid, status))
        supervisor.reap()

    def test_backoff_doubles_to_its_cap_then_resets_after_a_stable_run(self):
        sup = self.supervisor()
        [worker] = sup.slots
        sup.spawn(worker)
        delays = []
        for _ in range(7):
            self.clock.now += 0.5               # dies soon after starting
            self.die(sup, worker.pid)
            self.assertIsNone(worker.pid)
            delays.append(worker.due - self.clock.now)
            self.clock.now = worker.due - 0.01
            sup.respawn_due()
            self.assertIsNone(worker.pid, 'restarted before its backoff')
            self.clock.now = worker.due
            sup.respawn_due()
            self.assertIsNotNone(worker.pid)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(worker.restarts, 7)
        self.clock.now += sup.STABLE_SECONDS + 1    # a stable run
        self.die(sup, worker.pid)
        self.assertEqual(worker.due, self.clock.now)
        self.assertEqual(sup.next_due(), 0.0)
        sup.respawn_due()
        self.clock.now += 0.5
        self.die(sup, worker.pid)
        self.assertEqual(worker.due - self.clock.now, 1.0)
        self.assertRegex(self.log.texts('error')[-1],
                         r'^\[fake\] worker 0 \(pid \d+\) exit status 1 '
                         r'after 0\.5s; restarting in 1\.0s$')

    def test_the_stats_show_a_dead_worker_down(self):
        sup = self.supervisor()
        [worker] = sup.slots
        sup.spawn(worker)
        self.assertEqual(worker.bucket.values, {'_restarts': 0})
        worker.bucket.set('_pid', worker.pid)
        self.die(sup, worker.pid, status=signal.SIGKILL)
        self.assertEqual(worker.bucket.values['_pid'], 0)
        self.assertIn('killed by signal SIGKILL', worker.last_exit)

    def test_scaling_starts_idle_slots_and_drains_the_rest(self):
        sup = self.supervisor(slots=4)
        for worker in sup.slots[2:]:
            worker.wanted = False
        for worker in sup.wanted():
            sup.spawn(worker)
        subserver = sup.slots[0].subserver
        self.assertEqual(sup.scale(subserver, 4), sup.slots[2:])
        pids = [worker.pid for worker in sup.slots]
        self.assertNotIn(None, pids)
        self.assertEqual(sorted(sup.children), sorted(pids))
        for worker in sup.slots:
            worker.bucket.set('_pid', worker.pid)
        # Down to one: the others drain (SIGHUP); none is killed.
        self.assertEqual(sup.scale(subserver, 1), [])
        self.assertEqual(self.killed,
                         [(pid, signal.SIGHUP) for pid in pids[1:]])
        self.assertEqual(sorted(sup.draining), pids[1:])
        self.assertEqual(list(sup.children), pids[:1])
        self.assertEqual([w.wanted for w in sup.slots],
                         [True, False, False, False])
        # One that has drained shows down in the stats, and stays down.
        self.die(sup, pids[1], status=0)
        self.assertEqual(sup.slots[1].bucket.values['_pid'], 0)
        sup.tend()
        self.assertIsNone(sup.slots[1].pid)
        self.assertEqual(self.log.texts('error'), [])
        # Up again while worker 2 still drains: a new process takes its
        # slot, and the old one's exit leaves the new one in the stats.
        self.assertEqual(sup.scale(subserver, 3), sup.slots[1:3])
        new = sup.slots[2].pid
        sup.slots[2].bucket.set('_pid', new)
        self.die(sup, pids[2], status=0)
        self.assertEqual(sup.slots[2].bucket.values['_pid'], new)
        # Past graceful_timeout, a worker still draining is killed.
        self.clock.now += 31.0
        sup.tend()
        self.assertEqual(self.killed[-1], (pids[3], signal.SIGKILL))
        self.assertEqual(sorted(sup.children), sorted(
            w.pid for w in sup.slots[:3]))

    def test_a_hung_worker_is_aborted_then_killed(self):
        sup = self.supervisor(worker_timeout=5.0)
        [worker] = sup.slots
        sup.spawn(worker)
        pid = worker.pid
        worker.bucket.beat = self.wall.now
        worker.bucket.latest = (self.wall.now - 1.5, 'GET /slow')
        self.wall.now += 5.0
        sup.tend()
        self.assertEqual(self.killed, [])
        self.wall.now += 0.5
        sup.tend()
        self.assertEqual(self.killed, [(pid, signal.SIGABRT),
                                       (pid, signal.SIGCONT)])
        self.assertRegex(self.log.texts('error')[-1],
                         r'is hung: no heartbeat for \d+s \(worker_timeout '
                         r'5s\); its latest request, GET /slow, started 7s')
        self.wall.now += 60
        self.clock.now += sup.ABORT_SECONDS - 0.01
        sup.tend()
        self.assertEqual(len(self.killed), 2, 'aborted twice, or too soon')
        self.clock.now += 0.01
        sup.tend()
        self.assertEqual(self.killed[2:], [(pid, signal.SIGKILL)])
        self.clock.now += 10
        sup.tend()
        self.assertEqual(len(self.killed), 3, 'SIGKILL sent twice')
        self.die(sup, pid, status=signal.SIGKILL)
        self.assertEqual(worker.failures, 0, 'a hung worker is no crash loop')
        self.assertEqual(worker.due, self.clock.now)

    def test_a_worker_without_worker_timeout_is_never_aborted(self):
        sup = self.supervisor(worker_timeout=0.0)
        sup.spawn(sup.slots[0])
        self.wall.now += 3600
        sup.tend()
        self.assertEqual(self.killed, [])

    def test_a_worker_gets_worker_timeout_from_its_start(self):
        sup = self.supervisor(worker_timeout=5.0)
        sup.spawn(sup.slots[0])
        self.wall.now += 4.9        # no heartbeat yet, but only just started
        sup.tend()
        self.assertEqual(self.killed, [])

    def test_a_retired_worker_is_killed_at_its_deadline(self):
        sup = self.supervisor(graceful=30.0)
        [worker] = sup.slots
        sup.spawn(worker)
        old = worker.pid
        sup.replace(old, 'asked to be replaced')
        new = worker.pid
        self.assertNotEqual(new, old)
        self.assertEqual(list(sup.children), [new])
        [ready_r] = sup.replacing
        self.assertEqual(self.killed, [], 'drained before its replacement')
        sup.replacement_ready(ready_r)      # EOF: the replacement serves
        self.assertEqual(sup.replacing, {})
        self.assertEqual(self.killed, [(old, signal.SIGHUP)])
        self.clock.now += 29.9
        sup.tend()
        self.assertEqual(self.killed, [(old, signal.SIGHUP)])
        self.clock.now += 0.1
        sup.tend()
        self.assertEqual(self.killed[1:], [(old, signal.SIGKILL)])
        self.assertIn('pid %d did not finish draining' % old,
                      self.log.texts('warning')[-1])
        self.die(sup, old, status=signal.SIGKILL)
        self.assertEqual((worker.pid, worker.restarts), (new, 0))

    def test_a_replacement_failure_line_waits_for_its_eof(self):
        sup = self.supervisor()
        [worker] = sup.slots
        sup.spawn(worker)
        old = worker.pid

        def failing_fork(worker, ready_fd):
            os.write(ready_fd, b'worker 0 failed to start: boom\n')
            return self.fork(worker, ready_fd)
        sup.fork = failing_fork
        sup.replace(old, 'asked to be replaced')
        [ready_r] = sup.replacing
        sup.replacement_ready(ready_r)
        self.assertEqual(self.killed, [])
        sup.replacement_ready(ready_r)
        self.assertEqual(self.killed, [(old, signal.SIGHUP)])

    def test_stopping_neither_restarts_nor_replaces(self):
        sup = self.supervisor(slots=2)
        for worker in sup.slots:
            sup.spawn(worker)
        first, second = sup.slots
        sup.stopping = True
        self.die(sup, first.pid)
        sup.respawn_due()
        self.assertEqual(len(self.forked), 2)
        sup.replace(second.pid, 'asked to be replaced')
        self.assertEqual((len(self.forked), sup.replacing), (2, {}))
        sup.signal_all(signal.SIGTERM)
        self.assertEqual(self.killed, [(second.pid, signal.SIGTERM)])

    def test_a_worker_that_exits_before_its_first_beat_fails_the_start(self):
        sup = self.supervisor(slots=2)
        for worker in sup.slots:
            sup.spawn(worker)
        first, second = sup.slots
        self.assertIsNone(sup.starting_failure())
        self.assertFalse(sup.all_started())
        first.bucket.beat = second.bucket.beat = self.wall.now
        self.assertTrue(sup.all_started())
        self.exited.append((first.pid, 1 << 8))     # beat, then died
        self.assertIsNone(sup.starting_failure())
        self.assertIsNone(first.pid)
        second.bucket.beat = 0.0
        self.exited.append((second.pid, 3 << 8))
        self.assertEqual(sup.starting_failure(), '[fake] worker 1 exited '
                         'while starting (exit status 3).')

    def test_old_generation_workers_drain_once_the_new_ones_serve(self):
        sup = self.supervisor()
        sup.adopt([7, 8])
        sup.spawn(sup.slots[0])
        self.assertEqual(sorted(sup.pids()), [7, 8, sup.slots[0].pid])
        sup.drain_retired()
        self.assertEqual(self.killed, [(7, signal.SIGHUP),
                                       (8, signal.SIGHUP)])
        self.die(sup, 7)
        self.assertEqual(sup.slots[0].restarts, 0)
        self.assertNotIn(7, sup.pids())

    def test_an_orphan_reaped_is_ignored(self):
        sup = self.supervisor()
        sup.spawn(sup.slots[0])
        self.die(sup, 4242)
        self.assertEqual(self.log.lines, [])
        self.assertEqual(sup.slots[0].restarts, 0)


class TestAutoscalerInProcess(unittest.TestCase):
    """workers = 1..3: the decisions, against a fake clock and buckets."""

    def setUp(self):
        self.clock = _FakeClock()
        self.log = _NotedLog()
        self.subserver = types.SimpleNamespace(
            name='wsgi', kind='wsgi', settings=types.SimpleNamespace(
                workers=brim._WorkerCount(1, 3)))
        self.fixed = types.SimpleNamespace(
            name='tcp', kind='tcp', settings=types.SimpleNamespace(
                workers=brim._WorkerCount(2, 2)))
        self.pids = itertools.count(100)
        self.workers = []
        self.scaled = []
        self.scaler = brim._Autoscaler(self.scale, self.log, self.clock)
        self.scale(self.subserver, 1)
        self.scaled = []

    def scale(self, subserver, count):
        self.scaled.append(count)
        while len(self.workers) < count:
            worker = brim._WorkerSlot(subserver, len(self.workers),
                                      _FakeBucket())
            worker.pid = next(self.pids)
            worker.bucket.beat = 1.0
            self.workers.append(worker)
        del self.workers[count:]

    def seconds(self, count, share, in_flight=0):
        """``count`` seconds in which each worker serves ``share`` of each
        second and ends it with ``in_flight`` requests in hand."""
        for _ in range(count):
            for worker in self.workers:
                values = worker.bucket.values
                values['_busy_usec'] = (values.get('_busy_usec', 0) +
                                        int(share * 1e6))
                values['_in_flight'] = in_flight
            self.clock.now += 1.0
            self.scaler.tend([self.subserver, self.fixed], self.workers)

    def test_busy_adds_a_worker_up_to_the_most(self):
        self.seconds(1, 0.0)                # the first sample
        self.seconds(2, 0.9)
        self.assertEqual(self.scaled, [])
        self.seconds(1, 0.9)
        self.assertEqual(self.scaled, [2])
        self.assertEqual(self.log.texts('info'), [
            '[wsgi] every worker busy for 3s: 2 workers (1..3)'])
        self.assertEqual(self.scaler.decisions, {
            'wsgi': 'every worker busy for 3s: 2 workers (1..3)'})
        self.seconds(1, 0.9)        # the new worker's first sample
        self.seconds(3, 0.9)
        self.assertEqual(self.scaled, [2, 3])
        self.seconds(10, 5.0)       # 5: requests that overlap
        self.assertEqual(self.scaled, [2, 3])

    def test_one_idle_worker_is_not_all_busy(self):
        self.scale(self.subserver, 2)
        self.seconds(1, 0.0)
        for _ in range(5):
            self.workers[0].bucket.values['_busy_usec'] = 0
            self.seconds(1, 1.0)
            self.workers[0].bucket.values['_busy_usec'] = 0
        self.assertEqual(self.scaled, [2])

    def test_requests_held_in_flight_count_as_busy(self):
        self.seconds(1, 0.0, in_flight=1)
        self.seconds(3, 0.0, in_flight=1)
        self.assertEqual(self.scaled, [2])

    def test_quiet_retires_a_worker_down_to_the_least(self):
        self.scale(self.subserver, 3)
        self.seconds(1, 0.0)
        self.seconds(9, 0.1)
        self.assertEqual(self.scaled, [3])
        self.seconds(1, 0.1)
        self.assertEqual(self.scaled, [3, 2])
        self.assertEqual(self.log.texts('info')[-1],
                         '[wsgi] no worker busy for 10s: 2 workers (1..3)')
        self.seconds(1, 0.1)
        self.seconds(2, 0.0, in_flight=1)   # held requests: not quiet
        self.seconds(9, 0.0)
        self.assertEqual(self.scaled, [3, 2])
        self.seconds(1, 0.0)
        self.assertEqual(self.scaled, [3, 2, 1])
        self.seconds(30, 0.0)
        self.assertEqual(self.scaled, [3, 2, 1])

    def test_it_samples_once_a_second(self):
        self.seconds(1, 0.0, in_flight=1)
        for _ in range(10):     # the main loop turns ten times in a second
            self.clock.now += 0.1
            self.scaler.tend([self.subserver], self.workers)
        self.assertEqual(self.scaled, [])
        self.seconds(3, 0.0, in_flight=1)
        self.assertEqual(self.scaled, [2])


class _FakeRestarter(object):
    def __init__(self, problem):
        self.problem = problem
        self.execs = 0

    def check(self):
        return self.problem

    def exec_in_place(self):
        self.execs += 1


class _ReplacingSupervisor(object):
    """What the control channel asks of the supervisor."""

    def __init__(self):
        self.children = {}
        self.replaced = []

    def replace(self, pid, reason):
        self.replaced.append((pid, reason))


class _ControlledServer(object):
    """What the control channel asks of the Server."""

    def __init__(self):
        self.generation = 3
        self.logger = _NotedLog()
        self.restarter = _FakeRestarter(None)
        self.supervisor = _ReplacingSupervisor()
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))

    def status(self):
        return {'pid': 1, 'generation': self.generation}

    def listening_sockets(self):
        return [self.sock]


class TestControlChannelInProcess(unittest.TestCase):
    """Each verb of the control socket, asked over a socketpair (whose peer
    credentials are this process's)."""

    def setUp(self):
        self.server = _ControlledServer()
        self.addCleanup(self.server.sock.close)
        self.channel = brim._ControlChannel(self.server)

    def ask(self, request):
        """The channel's whole answer to ``request``, and the client end."""
        served, client = socket.socketpair()
        self.addCleanup(client.close)
        with served:
            client.sendall(request + b'\n')
            self.channel.serve_request(served)
        client.settimeout(5)
        return brim._read_all(client)

    def test_the_verbs(self):
        self.assertEqual(sorted(self.channel.VERBS), [
            b'addresses', b'ping', b'restart', b'retire', b'scale',
            b'sockets', b'status'])
        self.assertIn('_ControlChannel.VERBS', brim.Server.__doc__)

    def test_ping_answers_the_generation(self):
        self.assertEqual(self.ask(b'ping'), b'pong 3')

    def test_status_and_addresses_answer_json(self):
        self.assertEqual(json.loads(self.ask(b'status')),
                         {'pid': 1, 'generation': 3})
        port = self.server.sock.getsockname()[1]
        self.assertEqual(json.loads(self.ask(b'addresses')),
                         ['tcp 127.0.0.1 %d' % port])

    def test_sockets_hands_over_the_listening_sockets(self):
        served, client = socket.socketpair()
        with served, client:
            client.sendall(b'sockets\n')
            self.channel.serve_request(served)
            socks = brim._receive_sockets(client)
        port = self.server.sock.getsockname()[1]
        [(key, sock)] = socks.items()
        with sock:
            self.assertEqual(key, 'tcp 127.0.0.1 %d' % port)
            self.assertEqual(sock.getsockname()[1], port)
        self.assertIn('handed the listening sockets to a new brimd',
                      self.server.logger.texts('info'))

    def test_restart_answers_before_it_execs(self):
        self.assertEqual(self.ask(b'restart'), b'restarting')
        self.assertEqual(self.server.restarter.execs, 1)

    def test_a_refused_restart_says_why_and_does_not_exec(self):
        self.server.restarter.problem = 'bad conf'
        self.assertEqual(self.ask(b'restart'), b'refused: bad conf')
        self.assertEqual(self.server.restarter.execs, 0)

    def test_retire_only_from_a_child(self):
        self.assertEqual(self.ask(b'retire'), b'')
        self.assertEqual(self.server.supervisor.replaced, [])
        self.server.supervisor.children[os.getpid()] = object()
        self.assertEqual(self.ask(b'retire'), b'')
        self.assertEqual(self.server.supervisor.replaced,
                         [(os.getpid(), 'asked to be replaced')])

    def test_an_unknown_verb_is_closed_without_an_answer(self):
        self.assertEqual(self.ask(b'reboot'), b'')
        self.assertEqual(self.ask(b''), b'')
        self.assertEqual(self.server.restarter.execs, 0)
        self.assertEqual(self.server.logger.lines, [])

    def test_who_may_ask(self):
        may_ask = self.channel.may_ask
        other = os.getuid() + 1
        for verb in (b'ping', b'status', b'addresses', b'restart',
                     b'sockets'):
            self.assertTrue(may_ask(verb, 1, 0))
            self.assertTrue(may_ask(verb, 1, os.getuid()))
            self.assertEqual(may_ask(verb, 1, other), other == 0)
        self.server.supervisor.children[55] = object()
        self.assertTrue(may_ask(b'retire', 55, other))
        self.assertFalse(may_ask(b'retire', 56, 0))


class TestRestarterInProcess(unittest.TestCase):
    """What a restart in place runs, and that it needs a command line."""

    def test_the_command_line_runs_again_with_the_same_options(self):
        _parser, args = brim._parse_args(
            ['-c', 'a.conf', '-c', 'b.conf', '-p', 'x.pid', '-o', 'serve',
             '--port', '8080', 'mod:app'])
        command_line = brim._CommandLine('/srv/brim.py', args)
        options = ['-c', 'a.conf', '-c', 'b.conf', '-p', 'x.pid', '-o',
                   '--port', '8080']
        self.assertEqual(command_line.argv(), [
            sys.executable, '/srv/brim.py'] + options + ['serve', 'mod:app'])
        self.assertEqual(command_line.argv('check'), [
            sys.executable, '/srv/brim.py'] + options + ['check', 'mod:app'])

    def test_without_a_command_line_a_restart_is_refused(self):
        server = _ControlledServer()
        self.addCleanup(server.sock.close)
        server.notifier = brim._Notifier()
        sent = []
        server.notifier.send = sent.append
        restarter = brim._Restarter(server)
        restarter.restart()
        self.assertEqual(server.logger.texts('error'), [
            'restart in place refused: this brimd was not started from its '
            'command line'])
        self.assertTrue(sent[0].startswith('RELOADING=1\n'), sent)
        self.assertEqual(sent[1], 'READY=1\nSTATUS=restart refused: this '
                         'brimd was not started from its command line')


class TestStartPlanInProcess(unittest.TestCase):
    """Where a start's sockets come from, and whether it detaches."""

    def setUp(self):
        self.sock = socket.socket()
        self.addCleanup(self.sock.close)
        self.sock.bind(('127.0.0.1', 0))
        self.key = 'tcp 127.0.0.1 %d' % self.sock.getsockname()[1]

    def test_a_restart_in_place_carries_on_and_stays_where_it_is(self):
        fd = os.dup(self.sock.fileno())
        self.addCleanup(os.environ.pop, brim._INPLACE_ENV, None)
        os.environ[brim._INPLACE_ENV] = json.dumps({
            'generation': 4, 'start_time': 1234, 'fds': [fd],
            'workers': [7, 8]})
        plan = brim._in_place_plan(False, False)
        self.assertNotIn(brim._INPLACE_ENV, os.environ)
        [(key, sock)] = plan.sockets.items()
        sock.close()
        self.assertEqual((plan.origin, key), ('in place', self.key))
        self.assertEqual((plan.generation, plan.start_time, plan.old_workers),
                         (4, 1234, (7, 8)))
        self.assertFalse(plan.detach, 'a daemon in place is detached already')
        self.assertIsNone(brim._in_place_plan(False, False))

    def test_a_fresh_start_takes_a_handover_first(self):
        plan = brim._fresh_plan('/run/x.pid', False, False,
                                {self.key: self.sock})
        self.assertEqual((plan.origin, plan.sockets, plan.pid_file),
                         ('handover', {self.key: self.sock}, '/run/x.pid'))
        self.assertTrue(plan.detach)

    def test_a_fresh_start_binds_without_sockets_to_take_over(self):
        plan = brim._fresh_plan(None, True, True)
        self.assertEqual((plan.origin, plan.sockets), ('bind', {}))
        self.assertFalse(plan.detach, 'foreground stays attached')


# ---------------------------------------------------------------------------
# 6. Stats
# ---------------------------------------------------------------------------

class TestStats(BrimTestCase):
    """Shared-memory counters are exact and rolled up per subserver."""

    def two_port_conf(self, workers=1):
        self.port, self.admin = free_port(), free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = %d
            apps = echo

            [wsgi#admin]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (self.port, workers, self.admin))

    def wait_count(self, expected):
        def counted():
            wsgi = self.stats(self.admin)['wsgi']
            return wsgi if wsgi['request_count'] >= expected else None
        wsgi = wait_until(counted, timeout=10)
        self.assertEqual(wsgi['request_count'], expected)
        return wsgi

    def test_exact_counts_in_one_worker(self):
        self.two_port_conf(workers=1)
        self.start()
        total = 400
        results = self.load(self.port, '/echo', total, threads=10,
                            keep_alive=True, method='POST')
        self.assertEqual(results, [(200, b'')] * total)
        wsgi = self.wait_count(total)
        self.assertEqual(wsgi['echo.requests'], total)
        self.assertEqual(wsgi['0']['request_count'], total)
        self.assertEqual(wsgi['status_2xx_count'], total)
        # and it stays exact
        self.assertEqual(self.stats(self.admin)['wsgi']['request_count'],
                         total)

    def test_status_404_count(self):
        self.two_port_conf()
        self.start()
        for _ in range(3):
            self.assertEqual(self.http(self.port, 'GET', '/nope')[0], 404)
        self.echo_ok(self.port)
        wsgi = self.wait_count(4)
        self.assertEqual(wsgi['status_404_count'], 3)
        self.assertEqual(wsgi['status_4xx_count'], 3)
        self.assertEqual(wsgi['status_2xx_count'], 1)
        self.assertEqual(wsgi['status_5xx_count'], 0)

    def test_per_worker_keys(self):
        self.two_port_conf(workers=2)
        self.start()
        stats = self.stats(self.admin)
        self.assertEqual(sorted(k for k in stats['wsgi'] if k.isdigit()),
                         ['0', '1'])
        self.assertEqual(sorted(k for k in stats['wsgi#admin']
                                if k.isdigit()), ['0'])
        for label in ('0', '1'):
            worker = stats['wsgi'][label]
            self.assertEqual(worker['request_count'], 0)
            self.assertLessEqual(abs(worker['start_time'] - time.time()), 60)
        self.assertNotIn('start_time', {k: v for k, v in
                                        stats['wsgi'].items()
                                        if not isinstance(v, dict)})

    def test_custom_count_status_codes(self):
        self.stats_only_conf(wsgi_extra='count_status_codes = 404 405')
        self.start()
        self.assertEqual(self.http(self.port, 'POST', '/stats', b'')[0], 405)
        wsgi = self.stats(self.port)['wsgi']
        self.assertEqual(wsgi['status_405_count'], 1)
        self.assertNotIn('status_408_count', wsgi)


class _FakeSubserver(object):
    """What _StatsLayout reads of a subserver, and nothing more."""

    def __init__(self, name, kind, labels, stats_conf):
        self.name = name
        self.kind = kind
        self.labels = labels
        self.stats_conf = stats_conf
        self.starting_workers = len(labels)

    def bucket_labels(self):
        return list(self.labels)

    def worker_label(self, index):
        return '[%s] worker %s' % (self.name, self.labels[index])


class _Warnings(object):
    """A logger that keeps the warnings a bucket logs."""

    def __init__(self):
        self.lines = []

    def warning(self, message, *args):
        self.lines.append(message % args)


class TestStatsLayout(unittest.TestCase):
    """The layout in one process: buckets write, one read shows it all."""

    def setUp(self):
        self.wsgi = _FakeSubserver('wsgi', 'wsgi', ['0', '1'], {
            'start_time': 'worker', 'hits': 'sum', 'low': 'min',
            'peak': 'max'})
        self.daemons = _FakeSubserver('daemons', 'daemons', ['tick'], {
            'start_time': 'daemon', 'rounds': 'daemon'})
        self.layout = brim._StatsLayout([self.wsgi, self.daemons])
        self.warnings = _Warnings()
        self.buckets = [self.layout.bucket(self.wsgi, 0),
                        self.layout.bucket(self.wsgi, 1),
                        self.layout.bucket(self.daemons, 0)]
        for bucket in self.buckets:
            bucket.logger = self.warnings

    def stats(self, reading, name):
        return {stat.name: (stat.type, stat.per_worker, stat.rolled)
                for stat in reading.subservers[name].stats}

    def test_roll_ups_by_type(self):
        first, second, tick = self.buckets
        first.incr('hits', 3)
        second.incr('hits')
        second.incr('hits', 4)
        for bucket, low, peak, started in ((first, 7, 7, 100),
                                           (second, 2, 9, 200)):
            bucket.set('low', low)
            bucket.set('peak', peak)
            bucket.set('start_time', started)
        tick.incr('rounds', 6)
        tick.set('start_time', 300)
        reading = self.layout.read(50)
        self.assertEqual(reading.start_time, 50)
        self.assertEqual(list(reading.subservers), ['wsgi', 'daemons'])
        self.assertEqual(self.stats(reading, 'wsgi'), {
            'start_time': ('worker', {'0': 100, '1': 200}, None),
            'hits': ('sum', {'0': 3, '1': 5}, 8),
            'low': ('min', {'0': 7, '1': 2}, 2),
            'peak': ('max', {'0': 7, '1': 9}, 9)})
        self.assertEqual(self.stats(reading, 'daemons'), {
            'start_time': ('daemon', {'tick': 300}, None),
            'rounds': ('daemon', {'tick': 6}, None)})
        snapshot = brim._stats_snapshot(reading)
        self.assertEqual(len(snapshot.pop('workers')), 3)
        self.assertEqual(snapshot.pop('scale'), {
            'wsgi': {'target': 2, 'running': 0},
            'daemons': {'target': 1, 'running': 0}})
        self.assertEqual(snapshot, {
            'start_time': 50,
            'wsgi': {'hits': 8, 'low': 2, 'peak': 9,
                     '0': {'start_time': 100, 'hits': 3, 'low': 7,
                           'peak': 7},
                     '1': {'start_time': 200, 'hits': 5, 'low': 2,
                           'peak': 9}},
            'daemons': {'tick': {'start_time': 300, 'rounds': 6}}})
        metrics = brim._prometheus_text(reading).splitlines()
        for line in ('brim_start_time_seconds 50',
                     'brim_hits_total{subserver="wsgi"} 8',
                     'brim_hits_total{subserver="wsgi",worker="1"} 5',
                     'brim_low{subserver="wsgi"} 2',
                     'brim_rounds{subserver="daemons",worker="tick"} 6'):
            self.assertIn(line, metrics)

    def test_undeclared_name_is_ignored_and_logged_once(self):
        first, second, tick = self.buckets
        first.incr('hits')
        first.incr('nope')
        first.set('nope', 9)
        self.assertEqual(first.get('nope'), 0)
        self.assertEqual(first.get('hits'), 1)
        self.assertEqual(self.warnings.lines, [
            "[wsgi] worker 0: stat 'nope' is not declared, so it is not "
            "kept (get gives 0); add it to a stats_conf (declared: "
            "start_time, hits, low, peak)"])
        reading = self.layout.read(0)
        self.assertEqual(self.stats(reading, 'wsgi')['hits'],
                         ('sum', {'0': 1, '1': 0}, 1))
        subservers = reading.subservers.values()
        for sub in subservers:
            self.assertNotIn('nope', [stat.name for stat in sub.stats])
        # The one incr of hits is all there is, hidden slots included.
        written = [value for sub in subservers for stat in sub.stats
                   for value in stat.per_worker.values()]
        written += [field for sub in subservers for worker in sub.workers
                    for field in worker[1:]]
        self.assertEqual(sum(written), 1)

    def test_hidden_slots_show_in_workers_not_in_stats(self):
        first, second, tick = self.buckets
        second.set('start_time', int(time.time()) - 60)
        second.set('_pid', 42)
        second.set('_restarts', 3)
        second.incr('_served')
        second.beat()
        self.assertLessEqual(abs(second.heartbeat() - time.time()), 5)
        self.assertEqual(first.heartbeat(), 0)
        reading = self.layout.read(0)
        self.assertEqual(reading.subservers['wsgi'].workers[1][:4],
                         ('1', 42, 3, 1))
        [record] = [r for r in brim._stats_snapshot(reading)['workers']
                    if r['pid']]
        uptime = record.pop('uptime')
        self.assertTrue(60 <= uptime <= 65, uptime)
        self.assertEqual(record, {'subserver': 'wsgi', 'kind': 'wsgi',
                                  'label': '1', 'pid': 42, 'restarts': 3})
        self.assertEqual(sorted(self.stats(reading, 'wsgi')),
                         ['hits', 'low', 'peak', 'start_time'])
        second.reset()
        self.assertEqual(self.layout.read(0).subservers['wsgi'].workers[1],
                         ('1', 0, 0, 0, second.get('start_time'), 0, 0))
        self.assertEqual(second.heartbeat(), 0)

    def test_slots_counted_at_once(self):
        first, second, tick = self.buckets
        slots = first.slots(['hits', 'peak'])
        first.incr_slots(slots)
        first.incr_slots(slots)
        self.assertEqual((first.get('hits'), first.get('peak'),
                          second.get('hits')), (2, 2, 0))

    def test_scaled_down_buckets_keep_their_counts(self):
        first, second, tick = self.buckets
        first.incr('hits', 2)
        second.incr('hits', 5)
        second.set('_pid', 42)
        self.layout.set_target(self.wsgi, 1)
        # Worker 1 is beyond the target, but runs (drains): shown.
        reading = self.layout.read(0)
        self.assertEqual([w.label for w in reading.subservers['wsgi'].workers],
                         ['0', '1'])
        self.assertEqual(brim._stats_snapshot(reading)['scale']['wsgi'],
                         {'target': 1, 'running': 1})
        # Gone: no longer shown, and its count stays in the sum.
        second.set('_pid', 0)
        reading = self.layout.read(0)
        self.assertEqual([w.label for w in reading.subservers['wsgi'].workers],
                         ['0'])
        self.assertEqual(self.stats(reading, 'wsgi')['hits'],
                         ('sum', {'0': 2}, 7))
        metrics = brim._prometheus_text(reading).splitlines()
        for line in ('# TYPE brim_workers_target gauge',
                     'brim_workers_target{subserver="wsgi"} 1',
                     'brim_workers_running{subserver="wsgi"} 0',
                     'brim_workers_target{subserver="daemons"} 1'):
            self.assertIn(line, metrics)

    def test_siblings_tell_their_connections_and_who_is_ahead(self):
        first, second, tick = self.buckets
        mine = brim._Siblings(first, [second, tick])
        theirs = brim._Siblings(second, [first])
        margin = brim._SPREAD_MARGIN
        self.assertFalse(mine.ahead(100))   # no sibling accepts yet
        for bucket, pid in ((second, 42), (tick, 43)):
            bucket.set('_pid', pid)
            bucket.beat()
        theirs.tell(4)
        self.assertEqual(second.get('_open'), 5)
        self.assertFalse(mine.ahead(2 * 4 + margin))
        self.assertTrue(mine.ahead(2 * 4 + margin + 1))
        brim._Siblings(tick, []).tell(6)    # the least open counts
        self.assertTrue(mine.ahead(2 * 4 + margin + 1))
        # Not accepting (draining), down, or silent: left out.
        for leave_out, back in (
                (lambda: theirs.tell(None), lambda: theirs.tell(4)),
                (lambda: second.set('_pid', 0),
                 lambda: second.set('_pid', 42)),
                (lambda: second.set('_heartbeat', int(
                    (time.time() - brim._SIBLING_SILENT - 1) * 1000)),
                 second.beat)):
            leave_out()
            self.assertFalse(mine.ahead(2 * 4 + margin + 1))
            self.assertTrue(mine.ahead(2 * 6 + margin + 1))
            back()
            self.assertTrue(mine.ahead(2 * 4 + margin + 1))

    def test_in_flight_and_busy_time(self):
        first, second, tick = self.buckets
        first.begin()
        first.begin()
        first.end(0.25, first.slots(['hits']))
        workers = self.layout.read(0).subservers['wsgi'].workers
        self.assertEqual((workers[0].served, workers[0].in_flight,
                          workers[0].busy_usec), (2, 1, 250000))
        self.assertEqual(first.get('hits'), 1)
        # Cleared by a crash, then ended by the worker it replaced.
        first.clear_in_flight()
        first.end(0.1)
        workers = self.layout.read(0).subservers['wsgi'].workers
        self.assertEqual((workers[0].in_flight, workers[0].busy_usec),
                         (0, 350000))
        first.reset()
        self.assertEqual(self.layout.read(0).subservers['wsgi'].workers[0]
                         .busy_usec, 350000)

    def test_latest_request_per_bucket(self):
        first, second, tick = self.buckets
        self.assertEqual(first.latest_request(), (0, ''))
        second.note_request(1000.5, 'abc', 'GET', '/x' * 200)
        started, text = second.latest_request()
        self.assertEqual(started, 1000)
        self.assertEqual(text, ('abc GET ' + '/x' * 200)[:159])
        self.assertEqual(first.latest_request(), (0, ''))
        self.assertEqual(tick.latest_request(), (0, ''))


# The original brimd documentation's TCP stats example, verbatim but for
# bytes: it counts '<name>.connections' where stats_conf declared
# 'connections'.  Then a WSGI app and a daemon that use undeclared names.
APP_SOURCES['myundeclared.py'] = '''
from time import sleep, time

import mytcp


class HelloWorld(mytcp.HelloWorld):

    def __call__(self, subserver, stats, sock, ip, port):
        sock.send((self.message + '\\n').encode('utf-8'))
        sock.close()
        # Here's where we update the stats.
        stats.incr('%s.connections' % self.name)
        stats.set('%s.last_called' % self.name, time())

    @classmethod
    def stats_conf(cls, name, conf):
        return [('connections', 'sum'), ('last_called', 'max')]


class Tally(object):
    """Answers "<undeclared get> <declared get>" after using both."""

    def __init__(self, name, conf, next_app):
        self.next_app = next_app

    @classmethod
    def stats_conf(cls, name, conf):
        return [('tally', 'sum')]

    def __call__(self, env, start_response):
        stats = env['brim.stats']
        stats.incr('tally')
        stats.incr('nope')
        stats.set('nope', 7)
        stats.set('other', 1)
        body = b'%d %d' % (stats.get('nope'), stats.get('tally'))
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]


class TallyDaemon(object):
    """Uses an undeclared stat three times, logs what it read, waits."""

    def __init__(self, name, conf):
        self.name = name

    @classmethod
    def stats_conf(cls, name, conf):
        return [('rounds', 'daemon')]

    def __call__(self, subserver, stats):
        for _ in range(3):
            stats.incr('rounds')
            stats.incr('nope')
        subserver.logger.info('tally daemon read nope=%d rounds=%d'
                              % (stats.get('nope'), stats.get('rounds')))
        sleep(600)
'''


class TestUndeclaredStats(BrimTestCase):
    """A stat no stats_conf declared is ignored (get gives 0) and logged
    once per name in each worker, as in the original brimd."""

    def warnings(self, owner, name):
        return [line for line in self.log_lines() if ' WARNING ' in line and
                '%s: stat %r is not declared' % (owner, name) in line]

    def test_documented_tcp_example_two_workers(self):
        port = free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = myundeclared.HelloWorld
            message = Hello, hello!
            workers = 2
            ''' % port)
        self.start()
        replies = []
        owners = ['[tcp] worker 0', '[tcp] worker 1']

        def both_workers_used_their_stats():
            for _ in range(10):
                replies.append(tcp_exchange(port, b''))
            return all(self.warnings(owner, 'tcp.last_called')
                       for owner in owners)
        wait_until(both_workers_used_their_stats, timeout=20,
                   msg='both workers served')
        for _ in range(30):
            replies.append(tcp_exchange(port, b''))
        self.assertEqual(replies, [b'Hello, hello!\n'] * len(replies))
        self.assertGreaterEqual(len(replies), 40)
        self.assertNotIn('Traceback', self.log_text())
        for owner in owners:
            for name in ('tcp.connections', 'tcp.last_called'):
                [line] = self.warnings(owner, name)
                self.assertIn('add it to a stats_conf (declared: start_time, '
                              'log_lines_dropped, connections, last_called)',
                              line)

    def test_wsgi_app_and_daemon(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = tally

            [tally]
            call = myundeclared.Tally

            [daemons]
            daemons = counter

            [counter]
            call = myundeclared.TallyDaemon
            ''' % port)
        self.start()
        for count in range(1, 4):
            status, _headers, body = self.http(port)
            self.assertEqual((status, body), (200, b'0 %d' % count))
        self.wait_for_log(r'INFO - tally daemon read nope=0 rounds=3$')
        self.assertNotIn('Traceback', self.log_text())
        for owner, name in (('[wsgi] worker 0', 'nope'),
                            ('[wsgi] worker 0', 'other'),
                            ('[daemons] daemon counter', 'nope')):
            [line] = self.warnings(owner, name)
            self.assertNotIn('_heartbeat', line)
        self.assertRegex(self.warnings('[wsgi] worker 0', 'nope')[0],
                         r'WARNING [0-9a-f]+ \[wsgi\] worker 0: stat .*'
                         r'\(declared: start_time, log_lines_dropped, '
                         r'request_count, .*, '
                         r'tally\)$')


class TestTxn(EchoTestCase):
    """brim.txn has uuid.uuid4().hex's shape, 32 lowercase hex digits, and
    never repeats across workers and restarts."""

    def txns_from_every_worker(self, main_pid):
        """(worker pid, txn) of /txn requests on new connections until
        every worker of brimd ``main_pid`` has answered one."""
        workers = set(live_children_of(main_pid))
        self.assertEqual(len(workers), 2)
        pairs = []

        def every_worker_answered():
            client = HTTPClient(self.port)
            try:
                pid = int(client.request('GET', '/pid').body)
                txn = client.request('GET', '/txn').body.decode()
            finally:
                client.close()
            pairs.append((pid, txn))
            return workers <= {pid for pid, _txn in pairs}
        wait_until(every_worker_answered, timeout=20,
                   msg='every worker answered')
        return pairs

    def test_shape_and_uniqueness_across_workers_and_restart(self):
        self.echo_conf(workers=2)
        pairs = self.txns_from_every_worker(self.start())
        code, out, err = self.brim('restart')
        self.assertEqual((code, err), (0, ''), out)
        self.track(self.read_pid())
        pairs += self.txns_from_every_worker(self.read_pid())
        self.assertGreaterEqual(len({pid for pid, _txn in pairs}), 4)
        txns = [txn for _pid, txn in pairs]
        for txn in txns:
            self.assertRegex(txn, r'^[0-9a-f]{32}$')
        self.assertEqual(len(set(txns)), len(txns), 'a txn repeated')
        # The request log shows the same txns, and the /pid requests' are
        # of the same shape and never one of them.
        self.wait_for_log(r' GET /txn HTTP/1.1 200 ', count=len(txns))
        lines = self.request_lines()
        self.assertEqual(sorted(f['txn'] for f in lines
                                if f['path'] == '/txn'), sorted(txns))
        logged = [f['txn'] for f in lines]
        for txn in logged:
            self.assertRegex(txn, r'^[0-9a-f]{32}$')
        self.assertEqual(len(set(logged)), len(logged), 'a txn repeated')


class TestSignalsInTransitions(EchoTestCase):
    """Signals that come while a worker drains or brimd restarts in place
    are handled quietly."""

    def test_worker_signalled_while_draining(self):
        self.echo_conf()
        main = self.start()
        [worker] = live_children_of(main)
        result = {}

        def slow_request():
            try:
                result['response'] = self.http(self.port, 'GET', '/slow?1',
                                               timeout=20)
            except Exception as err:
                result['error'] = err

        client = threading.Thread(target=slow_request)
        client.start()
        self.addCleanup(client.join, 30)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        os.kill(main, signal.SIGHUP)    # shutdown: the worker drains

        def signalled_until_answered():
            stat = proc_stat(worker)
            if stat is not None and stat[1] == main:   # still that worker
                for signum in (signal.SIGHUP, signal.SIGUSR1):
                    os.kill(worker, signum)
            return not client.is_alive()
        wait_until(signalled_until_answered, timeout=20, interval=0.05)
        status, _headers, body = result['response']
        self.assertEqual((status, body), (200, b'slow:' + b'x' * 5000 +
                                          b':done'))
        self.assert_gone([main, worker])
        self.assertEqual([line for line in self.log_lines()
                          if 'wakeup fd' in line or 'Traceback' in line], [])

    def test_brimd_signalled_while_restarting_in_place(self):
        """logrotate's SIGUSR1 just after a SIGUSR2 does not end brimd."""
        self.echo_conf()
        main = self.start()
        os.kill(main, signal.SIGUSR2)

        def restarted_or_gone():
            if not pid_alive(main):
                return 'gone'
            os.kill(main, signal.SIGUSR1)
            return len([line for line in self.log_lines()
                        if ' serving [wsgi] ' in line]) == 2 and 'restarted'
        self.assertEqual(wait_until(restarted_or_gone, timeout=20,
                                    interval=0.01), 'restarted')
        self.assertTrue(pid_alive(main))
        self.assertEqual(self.read_pid(), main)
        self.echo_ok(self.port)


_PROM_NAME = r'[a-zA-Z_:][a-zA-Z0-9_:]*'
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')
_PROM_LABEL_END = re.compile(r'(?:[^"\\\n]|\\.)*"')
_PROM_VALUE = re.compile(r'[-+]?(?:[0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?|'
                         r'NaN|Inf)')
_PROM_TYPES = ('counter', 'gauge', 'histogram', 'summary', 'untyped')


def parse_prometheus(text):
    """Strictly parse the Prometheus text format (version 0.0.4).

    {family: {'type', 'help', 'samples': {((label, value), ...): float}}};
    raises ValueError naming the line for anything the format forbids or
    brimd should not send: samples before their # TYPE, a family split in
    two, a second HELP/TYPE, a repeated series, bad escapes or names.
    """
    if not text.endswith('\n'):
        raise ValueError('no newline at the end')
    families, done, current = {}, set(), None
    for number, line in enumerate(text[:-1].split('\n'), 1):
        where = 'line %d %r' % (number, line)
        comment = re.fullmatch(r'# (HELP|TYPE) (%s) (.*)' % _PROM_NAME, line)
        sample = re.fullmatch(r'(%s)(?:\{(.*)\})? (\S+)(?: -?[0-9]+)?'
                              % _PROM_NAME, line)
        if comment:
            name = comment.group(2)
        elif sample:
            name = sample.group(1)
        else:
            raise ValueError('not HELP, TYPE or a sample: ' + where)
        if name != current:
            if name in done:
                raise ValueError('%s split in two: %s' % (name, where))
            if current is not None:
                done.add(current)
            current = name
        family = families.setdefault(
            name, {'type': None, 'help': None, 'samples': {}})
        if comment:
            keyword, rest = comment.group(1).lower(), comment.group(3)
            if family['samples'] or family[keyword] is not None:
                raise ValueError('misplaced or second %s: %s' % (
                    keyword, where))
            if keyword == 'type' and rest not in _PROM_TYPES:
                raise ValueError('unknown type: ' + where)
            family[keyword] = rest if keyword == 'type' else \
                _prom_unescape(rest, '\\n', where)
            continue
        if family['type'] is None:
            raise ValueError('sample before its # TYPE: ' + where)
        labels = _prom_labels(sample.group(2) or '', where)
        if sample.group(2) is not None and not labels:
            raise ValueError('empty braces: ' + where)
        if not _PROM_VALUE.fullmatch(sample.group(3)):
            raise ValueError('bad value: ' + where)
        key = tuple(sorted(labels.items()))
        if key in family['samples']:
            raise ValueError('repeated series: ' + where)
        family['samples'][key] = float(sample.group(3))
    return families


def _prom_unescape(text, escapes, where):
    r"""``text`` with its ``\x`` escapes (x among ``escapes``) undone."""
    out, pos = [], 0
    while pos < len(text):
        char = text[pos]
        if char == '\\':
            escaped = text[pos + 1:pos + 2]
            if not escaped or escaped not in escapes:
                raise ValueError('bad escape: ' + where)
            out.append('\n' if escaped == 'n' else escaped)
            pos += 2
        else:
            out.append(char)
            pos += 1
    return ''.join(out)


def _prom_labels(text, where):
    """{name: value} from the inside of a sample's braces."""
    labels, pos = {}, 0
    while pos < len(text):
        match = _PROM_LABEL.match(text, pos)
        if not match:
            raise ValueError('bad label: ' + where)
        # The value ends at the first quote no backslash escapes.
        end = _PROM_LABEL_END.match(text, match.end())
        if not end:
            raise ValueError('unterminated label value: ' + where)
        if match.group(1) in labels:
            raise ValueError('repeated label: ' + where)
        labels[match.group(1)] = _prom_unescape(
            text[match.end():end.end() - 1], '\\"n', where)
        pos = end.end()
        if pos < len(text):
            if text[pos] != ',' or pos + 1 == len(text):
                raise ValueError('bad label separator: ' + where)
            pos += 1
    return labels


class TestPrometheusParser(unittest.TestCase):
    """The test's own parser refuses what the format forbids."""

    GOOD = ('# HELP a_total Some \\\\ help\\n.\n# TYPE a_total counter\n'
            'a_total{x="q\\"\\\\\\n",y="2"} 3\na_total 4\n'
            '# TYPE b gauge\n# HELP b B.\nb 1.5e3\n')

    def test_good(self):
        families = parse_prometheus(self.GOOD)
        self.assertEqual(families['a_total']['help'], 'Some \\ help\n.')
        self.assertEqual(families['a_total']['samples'], {
            (('x', 'q"\\\n'), ('y', '2')): 3.0, (): 4.0})
        self.assertEqual(families['b']['samples'], {(): 1500.0})

    def test_refusals(self):
        for bad in (self.GOOD[:-1],                              # no \n
                    self.GOOD + 'a_total{x="1"} 5\n',            # split
                    self.GOOD + '# TYPE b gauge\n',              # 2nd TYPE
                    'c 1\n',                                     # no TYPE
                    '# TYPE c gauge\nc 1\nc 2\n',                # repeated
                    '# TYPE c gauge\nc{x="1",x="2"} 1\n',
                    '# TYPE c gauge\nc{x="\\t"} 1\n',            # escape
                    '# TYPE c gauge\nc{x="1",} 1\n',
                    '# TYPE c gauge\nc{} 1\n',
                    '# TYPE c gauge\nc{x="1} 1\n',
                    '# TYPE c gauge\nc one\n',
                    '# TYPE c gauge\n\nc 1\n',
                    '# TYPE c-d gauge\n',
                    '# TYPE c flavour\n',
                    '# TYPE c gauge\nc 1\n# HELP c late\n'):
            with self.assertRaises(ValueError, msg=bad):
                parse_prometheus(bad)


class TestPrometheus(BrimTestCase):
    """WSGIStats in the Prometheus text format, read by a strict parser."""

    def metrics_server(self):
        self.port, self.admin, self.odd = free_port(), free_port(), \
            free_port()
        self.write_conf(r'''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = 2
            apps = gauges echo

            [wsgi#admin]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [wsgi#say "hi"\now]
            ip = 127.0.0.1
            port = %d

            [daemons]
            daemons = sample

            [sample]
            call = brim.daemon_sample.DaemonSample

            [gauges]
            call = myapps.Gauges

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (self.port, self.admin, self.odd))
        return self.start()

    def metrics(self, path='/metrics'):
        status, headers, body = self.http(self.admin, 'GET', path)
        self.assertEqual(status, 200, body)
        self.assertEqual(headers['content-type'],
                         'text/plain; version=0.0.4; charset=utf-8')
        return parse_prometheus(body.decode('utf-8'))

    def counted(self, expected):
        """The metrics once the wsgi subserver has counted ``expected``."""
        def ready():
            families = self.metrics()
            samples = families['brim_request_count_total']['samples']
            if samples[(('subserver', 'wsgi'),)] >= expected:
                return families
            return None
        return wait_until(ready, timeout=10)

    def test_every_stat_with_its_labels(self):
        self.metrics_server()
        for value in (5, 9, 3):
            self.assertEqual(self.http(self.port, 'GET', '/nothing')[0], 404)
            self.assertEqual(
                self.http(self.port, 'GET', '/gauge?%d' % value)[0], 200)
        families = self.counted(6)
        for name, family in families.items():
            self.assertTrue(name.startswith('brim_'), name)
            self.assertTrue(family['help'], name)
            self.assertEqual(family['type'], 'counter'
                             if name.endswith('_total') else 'gauge', name)
        snapshot = self.stats(self.admin)['wsgi']
        for name in ('request_count', 'status_2xx_count', 'status_404_count',
                     'peak', 'low', 'odd-name.total'):
            metric = 'brim_' + re.sub('[-.]', '_', name)
            if name not in ('peak', 'low'):
                metric += '_total'
            got = {dict(key).get('worker'): value for key, value in
                   families[metric]['samples'].items()
                   if dict(key)['subserver'] == 'wsgi'}
            # per worker, and rolled up (no worker label), as the JSON has
            expected = {label: snapshot[label][name] for label in '01'}
            expected[None] = snapshot[name]
            self.assertEqual(got, expected, metric)
        wsgi = (('subserver', 'wsgi'),)
        self.assertEqual(
            families['brim_request_count_total']['samples'][wsgi], 6)
        self.assertEqual(
            families['brim_status_404_count_total']['samples'][wsgi], 3)
        self.assertEqual(
            families['brim_odd_name_total_total']['samples'][wsgi], 17)
        peaks = families['brim_peak']['samples']
        self.assertIn(peaks[wsgi], (5, 9, 3))
        self.assertEqual(peaks[wsgi], max(
            peaks[wsgi + (('worker', w),)] for w in '01'))
        # names that would clash get their own family each
        self.assertEqual(families['brim_hits_total']['help'],
                         'brim stat hits (sum).')
        self.assertEqual(families['brim_hits_total_']['help'],
                         'brim stat hits_total (max).')
        self.assertEqual(families['brim_start_time_seconds_']['help'],
                         'brim stat start_time_seconds (max).')
        # daemon stats are gauges per daemon; nothing rolls them up
        self.assertEqual(list(families['brim_iterations']['samples']), [
            (('subserver', 'daemons'), ('worker', 'sample'))])
        # start_time: brimd's own, then one per worker and daemon
        starts = families['brim_start_time_seconds']['samples']
        self.assertLess(abs(starts[()] - time.time()), 60)
        self.assertIn((('subserver', 'daemons'), ('worker', 'sample')),
                      starts)
        self.assertIn((('subserver', 'wsgi'), ('worker', '1')), starts)
        # a section name with a quote, a backslash and an n: escaped, and
        # read back as it was written
        self.assertIn((('subserver', 'wsgi#say "hi"\\now'), ('worker', '0')),
                      starts)

    def test_format_query_and_own_path(self):
        self.metrics_server()
        query = self.metrics('/stats?format=prometheus')
        self.assertIn('brim_request_count_total', query)
        self.assertEqual(set(self.metrics()), set(query))
        # /metrics is WSGIStats's; no other subserver answers it
        self.assertEqual(self.http(self.port, 'GET', '/metrics')[0], 404)
        self.assertEqual(self.http(self.admin, 'POST', '/metrics', b'')[0],
                         405)
        status, _headers, body = self.http(self.admin, 'GET',
                                           '/stats?format=xml')
        self.assertEqual((status, body),
                         (400, b'format must be json, html or prometheus\n'))

    def test_metrics_path_option(self):
        self.stats_only_conf(stats_extra='metrics_path = /internal/metrics')
        self.start()
        self.admin = self.port
        self.assertIn('brim_request_count_total',
                      self.metrics('/internal/metrics'))
        self.assertEqual(self.http(self.port, 'GET', '/metrics')[0], 404)

    def test_empty_metrics_path_leaves_it_to_the_apps(self):
        self.stats_only_conf(stats_extra='metrics_path =')
        self.start()
        self.assertEqual(self.http(self.port, 'GET', '/metrics')[0], 404)
        self.admin = self.port
        self.assertIn('brim_request_count_total',
                      self.metrics('/stats?format=prometheus'))


#: A statsd line: a name, a number, a type (counter, timer, gauge).
STATSD_LINE = re.compile(rb'^([A-Za-z0-9_.-]+):(-?\d+(?:\.\d+)?)\|(c|ms|g)$')


class StatsdListener(object):
    """statsd for the tests: a UDP socket on 127.0.0.1 that keeps every
    datagram it receives."""

    def __init__(self, port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(('127.0.0.1', port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.datagrams = []

    def receive(self, seconds=0.0):
        """Keep what arrives within ``seconds`` (at least what is there)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.datagrams.append(self.sock.recv(65536))
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return

    def wait_for(self, condition, timeout=10.0, msg=None):
        """Keep what arrives until ``condition()`` holds; its value."""
        deadline = time.monotonic() + timeout
        while True:
            self.receive()
            held = condition()
            left = deadline - time.monotonic()
            if held or left <= 0:
                break
            select.select([self.sock], [], [], min(left, 0.2))
        if not held:
            raise AssertionError('%s (not true after %.1fs; received %r)' % (
                msg or 'statsd lines', timeout, self.datagrams[-5:]))
        return held

    def lines(self):
        return [line for datagram in self.datagrams
                for line in datagram.split(b'\n')]

    def parsed(self):
        """(name, value, type) of every line; fails on a malformed one."""
        parsed = []
        for line in self.lines():
            match = STATSD_LINE.match(line)
            if match is None:
                raise AssertionError('malformed statsd line %r' % line)
            name, value, kind = match.groups()
            parsed.append((name.decode(), float(value), kind.decode()))
        return parsed

    def total(self, name):
        return sum(value for n, value, kind in self.parsed()
                   if n == name and kind == 'c')

    def samples(self, name):
        return [value for n, value, kind in self.parsed()
                if n == name and kind == 'ms']

    def close(self):
        self.sock.close()


class TestStatsd(EchoTestCase):
    """[brim] statsd_host: what reaches statsd, and brimd without it."""

    def statsd_server(self, extra=''):
        self.statsd = StatsdListener()
        self.addCleanup(lambda: self.statsd.close())
        self.echo_conf(workers=2, brim_extra='statsd_host = 127.0.0.1:%d\n%s'
                       % (self.statsd.port, extra))
        return self.start()

    def test_every_request_reaches_statsd_and_resumes_after_it_is_down(self):
        self.statsd_server('statsd_prefix = myapp')
        paths = ['/pid'] * 14 + ['/nowhere'] * 6
        random.shuffle(paths)
        for path in paths:
            self.assertEqual(self.http(self.port, 'GET', path)[0],
                             200 if path == '/pid' else 404)
        statsd = self.statsd
        statsd.wait_for(lambda: len(statsd.samples(
            'myapp.brim.request.duration')) >= 20 and statsd.total(
            'myapp.brim.requests') >= 20, msg='20 requests reached statsd')
        statsd.receive(1.2)     # a tick more: anything sent twice shows
        self.assertEqual(statsd.total('myapp.brim.requests'), 20)
        self.assertEqual(statsd.total('myapp.brim.request.status.200'), 14)
        self.assertEqual(statsd.total('myapp.brim.request.status.404'), 6)
        durations = statsd.samples('myapp.brim.request.duration')
        self.assertEqual(len(durations), 20)
        self.assertTrue(all(0 <= ms < 10000 for ms in durations), durations)
        self.assertTrue(all(name.startswith('myapp.brim.')
                            for name, _value, _kind in statsd.parsed()))
        self.assertIn(('myapp.brim.workers', 2.0, 'g'), statsd.parsed())
        self.assertTrue(all(len(d) <= 1400 for d in statsd.datagrams))
        # statsd goes away: every request still succeeds, and the batches
        # that cannot go are dropped and counted.
        statsd.close()
        self.assertEqual([self.http(self.port, 'GET', '/pid')[0]
                          for _ in range(20)], [200] * 20)

        def dropped():
            self.assertEqual(self.http(self.port, 'GET', '/pid')[0], 200)
            return self.stats(self.port)['wsgi']['statsd_dropped']
        wait_until(dropped, msg='statsd_dropped counts the lost datagrams')
        # statsd is back on its port: lines arrive again by themselves.
        self.statsd = back = StatsdListener(statsd.port)
        self.addCleanup(back.close)

        def resumed():
            self.assertEqual(self.http(self.port, 'GET', '/raise')[0], 500)
            back.receive(0.05)
            return back.total('myapp.brim.request.status.500')
        wait_until(resumed, msg='statsd lines resumed')
        self.assertTrue(all(len(d) <= 1400 for d in back.datagrams))
        back.parsed()   # every line well formed

    def test_worker_restarts_are_counted(self):
        pid = self.statsd_server()
        self.statsd.wait_for(lambda: ('brim.workers', 2.0, 'g') in
                             self.statsd.parsed(), msg='the workers gauge')
        victim = live_children_of(pid)[0]
        os.kill(victim, signal.SIGKILL)
        self.statsd.wait_for(lambda: self.statsd.total(
            'brim.workers.restarts') >= 1, msg='the restart reached statsd')
        self.assertEqual(self.statsd.total('brim.workers.restarts'), 1)
        self.echo_ok(self.port)

    def test_check_refuses_a_statsd_host_that_is_not_host_port(self):
        for value in ('localhost', '::1:8125', '127.0.0.1:0', 'host:port'):
            self.echo_conf(brim_extra='statsd_host = %s' % value)
            line = ("[brim] statsd_host %r is not host:port; write it as "
                    "127.0.0.1:8125 (an IPv6 address as [::1]:8125).\n"
                    % value)
            self.assertEqual(self.brim('check'), (1, '', line))
        self.echo_conf(brim_extra='statsd_prefix = my app')
        code, out, err = self.brim('check')
        self.assertEqual((code, err.count('\n')), (1, 1))
        self.assertIn('[brim] statsd_prefix', err)
        self.echo_conf(brim_extra='statsd_host = [::1]:8125')
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        self.assertIn('  statsd_host = [::1]:8125\n', out)


class _RefusingSocket(object):
    """Where a _Statsd sends: refuses (as a full buffer does) until
    ``up``, then keeps what it is sent."""

    def __init__(self):
        self.up = False
        self.sent = []

    def connect(self, address):
        pass

    def send(self, datagram):
        if not self.up:
            raise BlockingIOError('Resource temporarily unavailable')
        self.sent.append(datagram)
        return len(datagram)

    def close(self):
        pass


class TestStatsdInProcess(unittest.TestCase):
    """_Statsd's batches, called directly."""

    def setUp(self):
        self.listener = StatsdListener()
        self.addCleanup(self.listener.close)
        self.statsd = brim._Statsd(socket.AF_INET,
                                   ('127.0.0.1', self.listener.port))
        self.addCleanup(self.statsd.close)

    def test_datagrams_are_lines_within_the_size(self):
        lines = [b'brim.x%d:%d|c' % (i, i) for i in range(500)]
        datagrams = brim._statsd_datagrams(lines, 1400)
        self.assertGreater(len(datagrams), 4)
        self.assertTrue(all(len(d) <= 1400 for d in datagrams))
        self.assertTrue(all(len(d) > 1300 for d in datagrams[:-1]))
        self.assertEqual(b'\n'.join(datagrams).split(b'\n'), lines)

    def test_counters_add_up_timers_do_not(self):
        for code in (200, 200, 404):
            self.statsd.request(code, 0.0125)
        self.statsd.count('workers.restarts')
        self.statsd.gauge('workers', 3)
        self.statsd.gauge('workers', 4)
        self.assertEqual(self.listener.datagrams, [])   # batched
        self.statsd.flush()
        self.listener.wait_for(lambda: self.listener.datagrams)
        [datagram] = self.listener.datagrams
        self.assertEqual(sorted(datagram.split(b'\n')), sorted([
            b'brim.requests:3|c', b'brim.request.status.200:2|c',
            b'brim.request.status.404:1|c', b'brim.workers.restarts:1|c',
            b'brim.workers:4|g'] + [b'brim.request.duration:12.500|ms'] * 3))

    def test_a_full_datagram_goes_at_once(self):
        for _ in range(200):
            self.statsd.request(200, 0.001)
        self.listener.wait_for(lambda: len(self.listener.datagrams) > 3)
        self.assertTrue(all(len(d) <= 1400 for d in self.listener.datagrams))
        self.statsd.flush()
        self.listener.wait_for(
            lambda: self.listener.total('brim.requests') == 200)
        self.assertEqual(len(self.listener.samples('brim.request.duration')),
                         200)

    def test_statsd_gone_costs_no_memory_and_lines_resume(self):
        self.statsd._sock.close()
        fake = self.statsd._sock = _RefusingSocket()
        for i in range(20000):
            self.statsd.request(200 + i % 300, 0.002)
            self.assertLess(self.statsd._size, 1400 + 200)
        self.statsd.flush()
        self.assertGreater(self.statsd.dropped, 20000 * 30 // 1400)
        self.assertEqual(self.statsd._timers, [])
        fake.up = True
        dropped = self.statsd.dropped
        self.statsd.request(200, 0.002)
        self.statsd.flush()
        self.assertEqual(self.statsd.dropped, dropped)
        self.assertEqual(len(fake.sent), 1)
        self.assertIn(b'brim.requests:1|c', fake.sent[0].split(b'\n'))

    def test_refused_by_a_closed_port_the_next_batch_tries_again(self):
        self.statsd.request(200, 0.001)
        self.statsd.flush()
        self.listener.wait_for(
            lambda: self.listener.total('brim.requests') == 1)
        port = self.listener.port
        self.listener.close()
        # The first batch after statsd went brings back an ICMP port
        # unreachable; a later one is refused, and dropped.
        wait_until(lambda: self.statsd.request(200, 0.001) or
                   self.statsd.flush() or self.statsd.dropped,
                   msg='a batch was refused')
        self.listener = StatsdListener(port)
        self.addCleanup(self.listener.close)

        def arrived():
            self.statsd.request(201, 0.001)
            self.statsd.flush()
            self.listener.receive(0.1)
            return self.listener.total('brim.request.status.201')
        wait_until(arrived, msg='lines resumed')


# ---------------------------------------------------------------------------
# 7. Logging
# ---------------------------------------------------------------------------

class TestLogging(EchoTestCase):
    """One NOTICE line per request, txn stamping, quoting."""

    def test_request_logged_once(self):
        self.echo_conf()
        self.start()
        self.assertEqual(self.http(self.port, 'GET', '/logged-once')[0], 404)
        self.echo_ok(self.port)
        self.wait_for_log(r' POST /echo HTTP/1.1 200 ')
        lines = [f for f in self.request_lines()
                 if f['path'] == '/logged-once']
        self.assertEqual(len(lines), 1, self.log_text())
        fields = lines[0]
        self.assertEqual((fields['method'], fields['protocol'],
                          fields['status']), ('GET', 'HTTP/1.1', '404'))
        self.assertIn(' NOTICE ', fields['line'])
        self.assertRegex(fields['txn'], r'^[0-9a-f]{6,}$')
        txns = [f['txn'] for f in self.request_lines()]
        self.assertEqual(len(txns), len(set(txns)), 'txns are not unique')

    def test_app_log_line_carries_request_txn(self):
        self.echo_conf()
        self.start()
        status, _h, body = self.http(self.port, 'GET', '/txn')
        self.assertEqual(status, 200)
        txn = body.decode()
        [app_line] = self.wait_for_log(r'app-line-marker')
        self.assertIn(' %s ' % txn, app_line)
        [request] = self.wait_for_log(r' GET /txn HTTP/1.1 200 ')
        self.assertEqual(parse_request_line(request)['txn'], txn)

    def test_request_line_txn_column(self):
        """The request line's txn column (as on the app's lines) is set."""
        self.echo_conf()
        self.start()
        status, _h, body = self.http(self.port, 'GET', '/txn')
        txn = body.decode()
        [app_line] = self.wait_for_log(r'app-line-marker')
        [request] = self.wait_for_log(r' GET /txn HTTP/1.1 200 ')
        app_words = app_line.split()
        request_words = request.split()
        column = app_words.index(txn)
        self.assertEqual(request_words[column], txn,
                         'app line: %r\nrequest line: %r'
                         % (app_line, request))

    def test_log_info_words_on_request_line(self):
        self.echo_conf()
        self.start()
        self.assertEqual(self.http(self.port, 'GET', '/txn')[0], 200)
        [request] = self.wait_for_log(r' GET /txn HTTP/1.1 200 ')
        self.assertTrue(request.endswith(' myapp: info-one info-two'),
                        request)
        self.assertEqual(parse_request_line(request)['extra'][-3:],
                         ['myapp:', 'info-one', 'info-two'])

    def test_request_line_bytes_out_and_in(self):
        self.echo_conf()
        self.start()
        self.echo_ok(self.port, '/echo', b'Just a test.')
        [request] = self.wait_for_log(r' POST /echo HTTP/1.1 200 ')
        rest = request.split(' POST /echo HTTP/1.1 200 ', 1)[1].split()
        self.assertEqual(rest[:2], ['12', '12'])

    def test_odd_path_never_breaks_the_line(self):
        self.echo_conf()
        self.start()
        status = self.http(self.port, 'GET', '/a%20b%0Ac%0D%09d%25')[0]
        self.assertEqual(status, 404)
        self.echo_ok(self.port)
        self.wait_for_log(r' POST /echo HTTP/1.1 200 ')
        lines = self.log_lines()
        stamp = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d')
        self.assertEqual([l for l in lines if not stamp.match(l)], [],
                         'a log line was broken')
        hits = [l for l in lines if ' GET /a%20b%0Ac%0D%09d%25 HTTP/1.1 404 '
                in l]
        self.assertEqual(len(hits), 1, self.log_text())

    def test_user_agent_with_spaces_is_one_word(self):
        self.echo_conf()
        self.start()
        self.http(self.port, 'GET', '/ua', headers={
            'User-Agent': 'Some User Agent (v1.0)'})
        [request] = self.wait_for_log(r' GET /ua HTTP/1.1 404 ')
        self.assertIn(' Some%20User%20Agent%20(v1.0) ', request)
        self.assertEqual(parse_request_line(request)['status'], '404')

# Apps that reconfigure logging the way Django and Flask apps do, and one
# that closes descriptors it does not own.
APP_SOURCES['logapps.py'] = '''
import logging
import logging.config
import os


def configure(disable_existing_loggers=True):
    logging.config.dictConfig({
        'version': 1,
        'disable_existing_loggers': disable_existing_loggers,
        'formatters': {'plain': {'format': 'app-handler %(message)s'}},
        'handlers': {'console': {'class': 'logging.StreamHandler',
                                 'formatter': 'plain'}},
        'root': {'handlers': ['console'], 'level': 'INFO'}})


configure()


class Unprintable(object):

    def __str__(self):
        raise RuntimeError('no str for this word')


class Reconfigures(object):
    """Configures logging at import and in each worker as Flask's docs
    show (disable_existing_loggers left True).  /reconfigure calls
    logging.shutdown(), closes and removes the root logger's handlers and
    configures logging as Django's defaults do (disable_existing_loggers
    False); /badword puts a word without a str in brim.log_info."""

    def __init__(self, name, conf, next_app):
        configure()
        self.next_app = next_app

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path == '/reconfigure':
            logging.shutdown()
            for handler in logging.root.handlers[:]:
                handler.close()
                logging.root.removeHandler(handler)
            configure(disable_existing_loggers=False)
        elif path == '/badword':
            env['brim.log_info'].append(Unprintable())
        else:
            return self.next_app(env, start_response)
        start_response('200 OK', [('Content-Length', '2')])
        return [b'ok']


class ClosesLog(object):
    """/closelog?PATH closes this process's descriptors of PATH, as a
    library that closes every descriptor it finds would."""

    def __init__(self, name, conf, next_app):
        self.next_app = next_app

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != '/closelog':
            return self.next_app(env, start_response)
        for name in os.listdir('/proc/self/fd'):
            try:
                if os.readlink('/proc/self/fd/' + name) == \\
                        env['QUERY_STRING']:
                    os.close(int(name))
            except OSError:
                pass
        start_response('200 OK', [('Content-Length', '2')])
        return [b'ok']
'''


class AppLoggingTestCase(EchoTestCase):
    """brimd in each of its modes, clients that keep one connection."""

    def chain_conf(self, first_app, log_file=True, brim_extra='',
                   wsgi_extra=''):
        """[wsgi] serving ``first_app`` (a logapps class), then misc, echo
        and stats."""
        self.port = free_port()
        return self.write_conf('''
            [brim]
            %s

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = first misc echo stats
            %s

            [first]
            call = logapps.%s

            [misc]
            call = myapps.Misc
            dir = %s

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (brim_extra, self.port, wsgi_extra, first_app, self.tmp),
            log_file=log_file)

    def launch(self, mode, stderr):
        """brimd with its stderr on ``stderr`` (a file, a descriptor or
        PIPE): attached (``foreground``, ``no-daemon``) or daemonized
        keeping it (``-o``).  The Popen, whose ``stderr`` is a PIPE's read
        end."""
        command = ['-o', 'start'] if mode == '-o' else [mode]
        proc = popen([sys.executable, BRIM, '-c', self.conf_path, '-p',
                      self.pid_file] + command, cwd=self.tmp, env=self.env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=stderr)

        if proc.stderr is not None:
            self.addCleanup(proc.stderr.close)     # after the kill below
        self.addCleanup(kill_process, proc)
        if mode == '-o':
            self.assertEqual(proc.wait(30), 0, 'start -o failed')
            self.track(self.read_pid())
        else:
            self.track(proc.pid)
        return proc

    def kept_alive(self):
        """``get(path, headers)`` on one connection, which must stay open:
        the Response, within 5 s."""
        client = HTTPClient(self.port, timeout=5)
        self.addCleanup(client.close)
        wait_until(lambda: not connect_refused(self.port), timeout=15,
                   msg='brimd listening')
        client.connect()
        sock = client.sock

        def get(path, headers=()):
            response = client.request('GET', path, headers=headers)
            self.assertIs(client.sock, sock, 'GET %s closed the connection'
                          % path)
            return response
        return get

    def dropped_lines(self, get, least=0):
        """log_lines_dropped once above ``least``, asked on the kept
        connection: workers copy the count once a second, and may copy
        it while lines are still being dropped."""
        def dropped():
            count = json.loads(get('/stats').body)['wsgi'][
                'log_lines_dropped']
            return count if count > least else None
        return wait_until(dropped, timeout=5,
                          msg='log_lines_dropped > %d' % least)


class TestAppsConfigureLogging(AppLoggingTestCase):
    """An app that runs dictConfig, whether it disables the loggers it does
    not name or not, or logging.shutdown(), leaves brim's logging and
    serving alone, in every mode brimd runs in."""

    def exercise(self, read):
        """Requests before and after the app reconfigures logging, on one
        connection; brim's lines of them reach what ``read`` reads."""
        get = self.kept_alive()
        txns = [get('/txn').body.decode()]
        self.assertEqual(get('/reconfigure').body, b'ok')
        txns.append(get('/txn').body.decode())
        self.assertEqual(get('/badword').status, 200)
        txns.append(get('/txn').body.decode())
        # An error ends its connection: this one gets its own.
        self.assertEqual(self.http(self.port, 'GET', '/raise')[0], 500)

        def logged():
            text = read()
            return text if ' GET /raise HTTP/1.1 500 ' in text else None
        text = wait_until(logged, timeout=5, msg='brim lines logged')
        for txn in txns:
            self.assertRegex(text, r' GET /txn HTTP/1.1 200 .* %s ' % txn)
        self.assertEqual(text.count('app-line-marker'), 3, text)
        self.assertIn(' GET /reconfigure HTTP/1.1 200 ', text)
        self.assertIn('ValueError: app-raised-marker', text)
        self.assertNotIn('RecursionError', text)
        self.assertNotIn('--- Logging error ---', text)
        # The /badword line could not be made: counted, not raised.
        self.assertGreater(self.dropped_lines(get), 0)
        return text

    def test_start_with_log_file(self):
        self.chain_conf('Reconfigures')
        self.start()
        self.exercise(self.log_text)
        self.stop()
        self.assertIn('brimd exited', self.log_text())

    def test_start_without_log_file(self):
        if brim._syslog_socket():
            self.skipTest('brimd logs to the syslog socket %s here, which '
                          'this test cannot read' % brim._syslog_socket())
        self.chain_conf('Reconfigures', log_file=False)
        self.start()
        beside_pid_file = os.path.join(self.tmp, 'brimd.log')
        self.exercise(lambda: self.log_text(beside_pid_file))

    def attached(self, mode):
        """Exercise brimd in ``mode``, logging to stderr, a file."""
        self.chain_conf('Reconfigures', log_file=False)
        path = os.path.join(self.tmp, 'stderr.out')
        with open(path, 'wb') as out:
            self.launch(mode, out)
        return self.exercise(lambda: self.log_text(path))

    def test_foreground(self):
        self.attached('foreground')

    def test_no_daemon(self):
        text = self.attached('no-daemon')
        # The main process, the same one, logs after the workers' dictConfig.
        self.assertRegex(text, r'brim INFO - brimd \S+ serving .* in one '
                         r'process')

    def test_output_option(self):
        self.attached('-o')


class TestLogDestinationsFail(AppLoggingTestCase):
    """A destination that fails costs lines, never a request: each line is
    one write that never waits; what fails is counted (log_lines_dropped)
    and reported by the first line that gets through."""

    def test_full_disk(self):
        self.chain_conf('ClosesLog', log_file=False,
                        brim_extra='log_file = /dev/full')
        self.start()
        get = self.kept_alive()
        started = time.monotonic()
        for number in range(50):
            self.assertEqual(get('/echo').status, 200)
        self.assertLess(time.monotonic() - started, 10)
        self.assertGreater(self.dropped_lines(get, 50), 50)

    def test_closed_descriptor(self):
        """An app closes the worker's log fd: EBADF until SIGUSR1 reopens
        the file; then the count comes first."""
        self.chain_conf('ClosesLog')
        pid = self.start()
        get = self.kept_alive()
        get('/closelog?' + self.log_file)
        for number in range(5):
            self.assertEqual(get('/lost-%d' % number).status, 404)
        self.assertGreater(self.dropped_lines(get), 0)
        os.kill(pid, signal.SIGUSR1)

        def reopened():
            get('/after-reopen')
            text = self.log_text()
            return text if ' GET /after-reopen HTTP/1.1 404 ' in text else None
        text = wait_until(reopened, timeout=5)
        first = text.index(' GET /after-reopen HTTP/1.1 404 ')
        reports = re.findall(r'WARNING - brim dropped (\d+) log lines? '
                             r'\(OSError: \[Errno 9\] Bad file descriptor\)',
                             text[:first])
        self.assertGreaterEqual(sum(map(int, reports)), 6, text)
        self.assertNotIn(' GET /lost-', text)

    def stuck_stderr(self, mode, journal=False):
        """brimd in ``mode`` logging to a pipe (or a socket, as journald
        gives: ``journal``) that nobody reads until several bufferfuls were
        lost, then is read."""
        self.chain_conf('ClosesLog', log_file=False,
                        wsgi_extra='log_headers = true')
        if journal:
            read_sock, write_sock = socket.socketpair()
            self.addCleanup(read_sock.close)
            with write_sock:
                self.launch(mode, write_sock.fileno())
            read_end = read_sock.fileno()
        else:
            read_end = self.launch(mode, subprocess.PIPE).stderr.fileno()
        get = self.kept_alive()
        pad = [('X-Pad', 'p' * 2000)]       # ~2 KiB lines: 64 KiB in 32
        started = time.monotonic()
        for number in range(200):
            self.assertEqual(get('/stuck-%d' % number, pad).status, 404)
        self.assertLess(time.monotonic() - started, 20)
        self.assertGreater(self.dropped_lines(get, 100), 100)
        # Read now, without waiting: a reader blocked on this pipe would
        # hold it past the test, and -o's brimd keeps it open till stopped.
        os.set_blocking(read_end, False)
        chunks = []

        def drained():
            get('/drained')
            while True:
                try:
                    chunk = os.read(read_end, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            text = b''.join(chunks).decode('utf-8', 'replace')
            return text if ' GET /drained HTTP/1.1 404 ' in text else None
        text = wait_until(drained, timeout=5)
        # The first line through says what was lost (a line that found the
        # pipe about full may have been lost since, and is told of next).
        first = text.index(' GET /drained HTTP/1.1 404 ')
        reports = re.findall(r'WARNING - brim dropped (\d+) log lines? '
                             r'\(BlockingIOError: ', text[:first])
        self.assertGreater(sum(map(int, reports)), 100, text[-3000:])

    def test_stuck_stderr_foreground(self):
        self.stuck_stderr('foreground')

    def test_stuck_stderr_no_daemon(self):
        self.stuck_stderr('no-daemon')

    def test_stuck_stderr_output_option(self):
        self.stuck_stderr('-o')

    def test_stuck_journal_socket_foreground(self):
        self.stuck_stderr('foreground', journal=True)


class TestLogHandlersInProcess(unittest.TestCase):
    """brim's handlers against what apps do to logging, in this process."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='brim-test-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.path = os.path.join(self.tmp, 'brim.log')
        self.name = 'brim-in-process-' + self._testMethodName
        # dictConfig acts on the whole process: put back what it changes.
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        disabled = {name: logger.disabled for name, logger in
                    logging.Logger.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)}

        def restore():
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, was in disabled.items():
                logging.getLogger(name).disabled = was
        self.addCleanup(restore)

    def text(self):
        with open(self.path, encoding='utf-8') as fp:
            return fp.read()

    def logger(self, log_file=None):
        logger = brim.get_logger(self.name, log_file=log_file or self.path)
        for handler in logger.handlers:
            self.addCleanup(handler.shut)
        return logger

    def test_batched_lines_go_out_whole_in_order(self):
        """In a worker whose threads take turns, lines below WARNING wait
        for a flush (the thread with the turn makes one before it waits
        for work) and go out in sends of whole lines of at most 4096
        bytes; a warning takes what waits out first, then itself."""
        logger = self.logger()
        [handler] = logger.handlers
        sends = []
        send = handler.send
        handler.send = lambda data: sends.append(data) or send(data)
        self.addCleanup(setattr, brim._Handler, 'batched', False)
        brim._Handler.batched = True
        for number in range(40):
            logger.info('line %d %s', number, 'x' * 200)
        self.assertEqual(self.text(), '')
        logger.warning('a warning')
        lines = self.text().splitlines()
        self.assertEqual([line.split()[-2] for line in lines[:-1]],
                         [str(number) for number in range(40)])
        self.assertTrue(lines[-1].endswith('a warning'), lines[-1])
        self.assertGreater(len(sends), 1)
        for data in sends:
            self.assertLessEqual(len(data), 4096)
            self.assertTrue(data.endswith(b'\n'))
        logger.info('after')
        handler.flush()
        self.assertTrue(self.text().endswith('after\n'))

    def test_dict_config_and_shutdown_leave_brim_logging(self):
        logger = self.logger()
        logging.config.dictConfig({'version': 1})   # disables the others
        logging.shutdown()
        logger.warning('still-logged-marker')
        self.assertIn('still-logged-marker', self.text())
        # A config that names brim's logger takes it, as logging does.
        taken = logging.handlers.BufferingHandler(10)
        logging.config.dictConfig({
            'version': 1, 'handlers': {'app': {'()': lambda: taken}},
            'loggers': {self.name: {'handlers': ['app']}}})
        logger.warning('taken-marker')
        self.assertEqual([r.getMessage() for r in taken.buffer],
                         ['taken-marker'])
        self.assertNotIn('taken-marker', self.text())

    def test_failing_file_counts_then_reports(self):
        logger = self.logger(log_file='/dev/full')
        before = brim._log_lines.dropped
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            for number in range(3):
                logger.warning('lost-%d', number)
        self.assertEqual(stderr.getvalue(), '')
        self.assertEqual(brim._log_lines.dropped - before, 3)
        handler, = logger.handlers
        handler.path = self.path
        handler.reopen()
        logger.warning('back-marker')
        lines = self.text().splitlines()
        self.assertRegex(lines[0], r' WARNING - brim dropped 3 log lines '
                         r'\(OSError: \[Errno 28\] No space left on '
                         r'device\)$')
        self.assertTrue(lines[1].endswith(' WARNING - back-marker'), lines)
        self.assertEqual(len(lines), 2, lines)

    def test_log_stream_loop_is_cut(self):
        """An app's StreamHandler on brim's logger writes to the stderr
        that is brim's log in a daemon, which logs to that handler..."""
        logger = self.logger()
        stream = brim._LogStream(logger, logging.ERROR)
        looping = logging.StreamHandler(stream)
        logger.addHandler(looping)
        self.addCleanup(logger.removeHandler, looping)
        before = brim._log_lines.dropped
        stream.write('stray-print-marker\n')
        self.assertEqual(brim._log_lines.dropped - before, 1)
        lines = self.text().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].endswith(
            ' ERROR - STDOUT/ERR: stray-print-marker'), lines)

    def test_syslog_socket_never_waits(self):
        path = os.path.join(self.tmp, 'log')
        syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(syslog.close)
        syslog.bind(path)
        handler = brim._SyslogHandler(path, brim._FACILITIES['local0'])
        handler.setFormatter(brim._Formatter('%(name)s %(levelname)s '
                                             '%(txn)s %(message)s'))
        handler.addFilter(brim._TxnFilter())
        self.addCleanup(handler.shut)

        def log(text):
            handler.handle(brim._RequestRecord('brim', text))
        log('first')
        self.assertEqual(syslog.recv(4096), b'<133>brim NOTICE - first\0')
        # Nobody reads: the queue fills; a send that waited would hang.
        flood = threading.Thread(target=lambda: [
            log('flood-%d' % number) for number in range(2000)])
        flood.start()
        flood.join(10)
        self.assertFalse(flood.is_alive(), 'a send waited on syslog')
        self.assertGreater(handler.dropped, 0)
        syslog.setblocking(False)
        while True:
            try:
                syslog.recv(4096)
            except BlockingIOError:
                break
        log('after')
        self.assertRegex(syslog.recv(4096), rb'^<132>brim WARNING - brim '
                         rb'dropped \d+ log lines \(BlockingIOError: ')
        self.assertEqual(syslog.recv(4096), b'<133>brim NOTICE - after\0')
        # syslog restarts: the next line connects again.
        syslog.close()
        os.unlink(path)
        restarted = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(restarted.close)
        restarted.bind(path)
        log('restarted')
        self.assertEqual(restarted.recv(4096),
                         b'<133>brim NOTICE - restarted\0')


# ---------------------------------------------------------------------------
# 8. HTTP semantics
# ---------------------------------------------------------------------------

class TestHTTP(EchoTestCase):
    """A brimd's WSGI requests end to end: keep-alive, the environ apps
    see, the sockets, and connections that wait (TestHTTPFraming and the
    classes after it test the HTTP path in this process)."""

    def test_keep_alive(self):
        self.echo_conf()
        self.start()
        conn = httpclient.HTTPConnection('127.0.0.1', self.port, timeout=5)
        self.addCleanup(conn.close)
        conn.request('GET', '/port')
        first = conn.getresponse()
        first_port = first.read()
        self.assertEqual(first.status, 200)
        self.assertFalse(first.will_close)
        sock = conn.sock
        conn.request('GET', '/port')
        second = conn.getresponse()
        self.assertEqual(second.read(), first_port)
        self.assertIs(conn.sock, sock)
        self.assertEqual(int(first_port), sock.getsockname()[1])

    def test_wsgiref_validator_except_brim_key(self):
        """Everything but the documented env['brim'] passes the validator."""
        self.echo_conf()
        self.start()
        status, headers, body = self.http(self.port, 'GET',
                                          '/valid_without_brim_key')
        self.assertEqual((status, body), (200, b'validated'),
                         self.log_text()[-3000:])
        status, headers, body = self.http(self.port, 'POST',
                                          '/valid_without_brim_key', b'xyz')
        self.assertEqual((status, body), (200, b'validated'))

    def test_tcp_nodelay_wsgi(self):
        self.echo_conf()
        self.start()
        status, _h, body = self.http(self.port, 'GET', '/nodelay')
        self.assertEqual(status, 200)
        if body == b'unknown':
            self.skipTest('a WSGI app cannot see its connection socket')
        self.assertEqual(body, b'nodelay=1')

    def test_tcp_nodelay_tcp_handler(self):
        port = free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = mytcp.NoDelay
            ''' % port)
        self.start()
        self.assertEqual(tcp_exchange(port, b''), b'nodelay=1')

    def test_idle_keep_alive_connections_hold_no_thread(self):
        self.echo_conf()
        pid = self.start()
        [worker] = live_children_of(pid)
        clients = []
        for n in range(40):
            client = HTTPClient(self.port)
            self.addCleanup(client.close)
            response = client.request('POST', '/echo', b'%d' % n)
            self.assertEqual(response.body, b'%d' % n)
            clients.append(client)
        threads = len(os.listdir('/proc/%d/task' % worker))
        self.assertLess(threads, 20, 'a thread per idle connection')
        for n, client in enumerate(clients):   # all still served
            response = client.request('POST', '/echo', b'again %d' % n)
            self.assertEqual(response.body, b'again %d' % n)

    def test_blocking_requests_run_at_once(self):
        """A request that waits (here: sleeps) passes the turn on: twelve
        half-second keep-alive requests on one worker take about half a
        second, not six."""
        self.echo_conf()
        self.start()
        results = []

        def sleeper():
            # The second request on a connection is the one that queues.
            conn = httpclient.HTTPConnection('127.0.0.1', self.port,
                                             timeout=10)
            try:
                for path in ('/echo', '/slowecho?0.5'):
                    conn.request('POST', path, body=b'z')
                    response = conn.getresponse()
                    results.append((path, response.status, response.read()))
            finally:
                conn.close()
        threads = [threading.Thread(target=sleeper) for _ in range(12)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        took = time.monotonic() - began
        self.assertEqual(sorted(results), [('/echo', 200, b'z')] * 12 +
                         [('/slowecho?0.5', 200, b'z')] * 12)
        self.assertLess(took, 2.0)


class _PoolJob(object):
    """A connection's job for TestConnectionPool: the client's first byte
    says what its serve does."""

    unsent = None
    filled = False
    armed = None

    def __init__(self, test, sock, address):
        self.test = test
        self.sock = sock
        self.client = address[0]
        self.idle = False
        self.kind = None

    def serve(self, turn):
        test = self.test
        try:
            data = self.sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return self             # parked until the client sends
        self.kind = self.kind or data.decode()
        test.served.append((self.kind, threading.get_ident()))
        if self.kind in 'hl':       # answers, and the pool sends it
            if self.kind == 'l':    # after computing for twice the hold
                end = time.thread_time() + 2 * brim._HOLD_SECONDS
                while time.thread_time() < end:
                    pass
            test.answers_held.append(len(turn.pool.answered))
            self.unsent = b'answer %d' % len(test.answers_held)
            self.idle = True
            return self
        if self.kind == 'H':        # a long answer
            self.unsent = b'y' * (1 << 20)
            return self
        if self.kind == 'e':        # the client sends more meanwhile
            test.released['e'].wait(10)
            self.idle = True
            return self
        if self.kind == 'p' and not self.idle:
            self.idle = True
            return self
        if self.kind == 'f' and len(test.served_on('f')) == 1:
            test.released['f'].wait(10)
            return self             # parked before its first answer
        if self.kind in 'wsb':
            if self.kind == 'w':
                turn.pass_on()
            test.released[self.kind].wait(10)
        if self.kind == 'c':        # computes for 8 ms, under _STALL
            end = time.thread_time() + 0.008
            while time.thread_time() < end:
                pass
        if self.kind in 'aA':
            test.passed_before_app.append(turn.before_app())
        if self.kind == 'A':        # an app that waits, as on a database
            time.sleep(0.1)
        return self.close()

    def try_send_unsent(self):
        try:
            sent = self.sock.send(self.unsent, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self.unsent = self.unsent[sent:] or None
        return self.unsent is None

    def close(self):
        self.test.closed.append(self.kind)
        self.sock.close()


class TestConnectionPool(unittest.TestCase):
    """The threads that take turns to accept and serve, in this process,
    on a loopback listening socket."""

    def setUp(self):
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.addCleanup(self.listener.close)
        self.stop_r, self.stop_w = os.pipe()
        self.addCleanup(os.close, self.stop_r)
        self.addCleanup(os.close, self.stop_w)
        self.accepted_on = []
        self.served = []            # (kind, thread) in the order served
        self.closed = []
        self.released = {kind: threading.Event() for kind in 'wsfbe'}
        self.passed_before_app = []
        self.answers_held = []      # answers held as each 'h' was served
        self.out_of_fds = 0         # accepts to fail so, before the rest
        for event in self.released.values():
            self.addCleanup(event.set)

    def accept(self):
        if self.out_of_fds:
            self.out_of_fds -= 1
            return brim._NO_DESCRIPTORS
        try:
            sock, address = self.listener.accept()
        except BlockingIOError:
            return None
        self.accepted_on.append(threading.get_ident())
        return sock, address

    def pool(self, limit=10, idle_timeout=30.0, handle=None, siblings=None):
        pool = brim._ConnectionPool(
            self.listener, self.stop_r, self.accept,
            handle or (lambda sock, address: _PoolJob(self, sock, address)),
            limit, idle_timeout, brim.logging.getLogger('test'), 'worker',
            siblings or brim._Siblings(_FakeBucket(), []))
        self.addCleanup(self.stop, pool)
        return pool

    def stop(self, pool):
        for event in self.released.values():
            event.set()
        os.write(self.stop_w, b'\0')
        wait_until(lambda: pool.stopping and not pool.conns.open)

    def client(self, kind):
        sock = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(sock.close)
        sock.sendall(kind.encode())
        return sock

    def served_on(self, kind):
        return [thread for k, thread in self.served if k == kind]

    def test_quick_connections_are_served_by_the_thread_that_accepts(self):
        self.pool()
        for _ in range(20):
            self.client('q')
        wait_until(lambda: len(self.closed) == 20)
        threads = set(self.accepted_on) | set(self.served_on('q'))
        self.assertEqual(len(threads), 1,
                         'quick connections were handed between threads')

    def test_held_answers_are_sent_before_the_turn_waits(self):
        pool = self.pool()
        client = self.client('h')
        self.assertEqual(client.recv(100), b'answer 1')
        # Parked once sent: its next request is served, and answered.
        client.sendall(b'h')
        self.assertEqual(client.recv(100), b'answer 2')
        self.assertEqual(self.answers_held, [0, 0])
        self.assertEqual(pool.answered, [])

    def test_an_answer_that_took_longer_than_the_hold_is_sent_at_once(self):
        clients = [self.client('l') for _ in range(3)]     # in the backlog
        self.pool()
        for client in clients:
            self.assertTrue(client.recv(100).startswith(b'answer '))
        self.assertEqual(self.answers_held, [0, 0, 0])

    def test_a_client_slow_to_take_its_answer_holds_up_no_one(self):
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        pool = self.pool()
        slow = self.slow_client()
        slow.sendall(b'H')
        # Part of it is sent; the rest waits in epoll for the client.
        self.assertEqual(select.select([slow], [], [], 10)[0], [slow])
        quick = self.client('h')
        self.assertEqual(quick.recv(100), b'answer 1')
        received = b''
        while len(received) < 1 << 20:
            received += slow.recv(1 << 16)
        self.assertEqual(received, b'y' * (1 << 20))
        self.assertEqual(pool.turn, 0)      # no thread waited on it
        slow.sendall(b'H')          # parked again once all was sent
        self.assertEqual(slow.recv(10), b'y' * 10)

    def slow_client(self):
        slow = socket.socket()
        self.addCleanup(slow.close)
        slow.settimeout(10)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        slow.connect(self.listener.getsockname())
        return slow

    def big_answers_to_a_slow_client(self):
        """A pool answering every request with ``body`` (as big as brim
        holds back), and a client that takes it a little at a time:
        (pool, worker, client, body)."""
        body = b'z' * (brim._HOLD_MAX - 1024)

        def app(env, start_response):
            start_response('200 OK', [('Content-Length', str(len(body)))])
            return [body]
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        pool, worker = self.http_pool(app)
        return pool, worker, self.slow_client(), body

    def test_an_http_answer_sent_as_the_client_reads(self):
        pool, worker, slow, body = self.big_answers_to_a_slow_client()
        answers = slow.makefile('rb')
        for _ in range(2):      # its next request is served after it
            slow.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            answer = read_response(answers, 'GET')
            self.assertEqual((answer.status, answer.body), (200, body))
        self.assertEqual(pool.turn, 0)      # no thread waited on it
        self.assertEqual(worker.errors(), [])

    def test_answers_are_sent_together_and_at_most_so_many_wait(self):
        self.listener.listen(64)
        clients = [self.client('h') for _ in range(40)]     # in the backlog
        # A busy machine must not pass the turn on (a job kept from the
        # CPU for _STALL) nor end the hold (_HOLD_SECONDS) here.
        for name in ('_STALL', '_HOLD_SECONDS'):
            patch = unittest.mock.patch.object(brim, name, 60.0)
            patch.start()
            self.addCleanup(patch.stop)
        self.pool(limit=100)
        answers = sorted(client.recv(100) for client in clients)
        self.assertEqual(answers, sorted(b'answer %d' % (n + 1)
                                         for n in range(40)))
        # Served in a row: the answers waited for each other, up to
        # _ANSWERS_HELD at a time.
        held = brim._ANSWERS_HELD
        self.assertEqual(self.answers_held[:held + 1],
                         list(range(held)) + [0])
        self.assertEqual(max(self.answers_held), held - 1)

    def test_what_comes_while_a_connection_is_served_is_not_lost(self):
        pool = self.pool()
        client = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(client.close)
        wait_until(lambda: pool.conns.parked)   # in epoll from now on
        client.sendall(b'e')
        wait_until(lambda: len(self.served_on('e')) == 1)
        client.sendall(b'e')    # its edge comes while the job is out
        wait_until(lambda: pool.conns.edges)
        self.released['e'].set()
        wait_until(lambda: len(self.served_on('e')) == 2)

    def http_pool(self, app):
        """A pool of brim's own HTTP connections serving ``app``."""
        worker = _SeamWorker(app)

        def handle(sock, address):
            sock.setblocking(False)     # as brim's plain connections
            return brim._HTTPConnection(worker.site, sock, address)
        return self.pool(handle=handle), worker

    def test_a_read_that_fills_its_buffer_is_followed_by_a_look(self):
        # Edge-triggered epoll tells of bytes once.  A burst that arrives
        # whole while the turn is busy is one edge; the read it wakes
        # takes _RECV_SIZE bytes, ending here on a request's end, and the
        # rest of the burst has no edge of its own to come.
        holding, release = threading.Event(), threading.Event()

        def app(env, start_response):
            if env['PATH_INFO'] == '/hold':
                holding.set()
                release.wait(10)
            start_response('200 OK', [('Content-Length', '2')])
            return [b'ok']
        # The turn stays with /hold, so no thread waits in epoll as the
        # burst comes; and the client may send all of it at once.
        for patch in (unittest.mock.patch.object(brim, '_STALL', 60.0),
                      unittest.mock.patch.object(brim._PoolThread, 'blocked',
                                                 lambda *args: False)):
            patch.start()
            self.addCleanup(patch.stop)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        pool, worker = self.http_pool(app)
        self.addCleanup(release.set)
        request = b'GET /%s HTTP/1.1\r\nHost: x\r\n\r\n'
        one = request % (b'a' * (64 - len(request % b'')))
        self.assertEqual(brim._RECV_SIZE % len(one), 0)
        burst = brim._RECV_SIZE // len(one) + 6
        client = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(client.close)
        answers = client.makefile('rb')
        client.sendall(one)
        self.assertEqual(read_response(answers).body, b'ok')
        wait_until(lambda: pool.conns.parked)   # waits in epoll
        holder = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(holder.close)
        holder.sendall(request % b'hold')
        self.assertTrue(holding.wait(10))
        client.sendall(one * burst)
        release.set()
        for n in range(burst):
            answer = read_response(answers)     # times out if left unread
            self.assertEqual((n, answer.body), (n, b'ok'))
        self.assertEqual(worker.errors(), [])

    def test_out_of_descriptors_it_closes_no_answer_being_sent(self):
        pool, worker, slow, body = self.big_answers_to_a_slow_client()
        slow.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        # Its answer waits for it to read (parked for EPOLLOUT).
        wait_until(lambda: any(job.unsent is not None
                               for job, _since in pool.conns.parked.values()))
        idle = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(idle.close)
        wait_until(lambda: len(pool.conns.parked) == 2)
        self.out_of_fds = 1
        with self.assertLogs('test', logging.ERROR) as logged:
            waking = socket.create_connection(self.listener.getsockname(),
                                              10)
            self.addCleanup(waking.close)
            self.assertEqual(idle.recv(100), b'')   # closed for room
        self.assertIn('out of file descriptors', logged.output[0])
        answer = read_response(slow.makefile('rb'))
        self.assertEqual((answer.status, answer.body), (200, body))
        self.assertEqual(worker.errors(), [])

    def test_the_turn_passes_before_a_connection_waits(self):
        pool = self.pool()
        self.client('w')
        wait_until(lambda: self.served_on('w'))
        self.client('q')
        wait_until(lambda: 'q' in self.closed)
        self.assertNotEqual(self.served_on('q'), self.served_on('w'))
        self.assertEqual(self.closed, ['q'])
        # Done, the thread waits for a turn: none is started for the next.
        self.released['w'].set()
        wait_until(lambda: len(pool.idle) == 1)
        self.client('q')
        wait_until(lambda: self.closed.count('q') == 2)
        [first, second] = self.served_on('q')
        self.assertEqual(first, second)

    def test_a_stalled_connection_loses_the_turn(self):
        self.pool()
        self.client('s')
        wait_until(lambda: self.served_on('s'))
        self.client('q')
        wait_until(lambda: 'q' in self.closed)
        self.assertNotIn('s', self.closed)
        self.assertNotEqual(self.served_on('q'), self.served_on('s'))

    def test_an_app_that_waits_has_the_next_ones_pass_the_turn(self):
        pool = self.pool()
        self.client('a')
        wait_until(lambda: self.passed_before_app == [False])
        self.client('b')        # blocked, without passing the turn on
        wait_until(lambda: pool.apps_wait())
        self.assertEqual(pool.turn, 1)
        self.client('a')
        wait_until(lambda: len(self.passed_before_app) == 2)
        self.assertEqual(self.passed_before_app, [False, True])
        self.released['b'].set()

    def test_an_app_that_computes_keeps_the_turn(self):
        pool = self.pool()
        for kind in 'cccca':
            self.client(kind)
        wait_until(lambda: self.passed_before_app)
        self.assertEqual(self.passed_before_app, [False])
        self.assertFalse(pool.apps_wait())

    def serve_one(self, pool, kind):
        """Have a connection of ``kind`` served, and wait until its job is
        judged: its thread is idle again."""
        closed = len(self.closed)
        self.client(kind)
        wait_until(lambda: len(self.closed) > closed and len(pool.idle) == 1,
                   interval=0.001)

    def apps_judged_to_wait(self, quick_seconds=0.0):
        """A pool whose apps were judged to wait, for a minute, as the
        watch may judge wrongly on a machine short of CPUs.  Quick jobs
        are those over in 50 ms here (a loaded machine can take 0.5 ms
        for a quick one), and ``quick_seconds`` of them end that."""
        for name, value in (('_APPS_WAIT_SECONDS', 60.0), ('_WAITED', 0.05),
                            ('_QUICK_SECONDS', quick_seconds)):
            patch = unittest.mock.patch.object(brim, name, value)
            patch.start()
            self.addCleanup(patch.stop)
        pool = self.pool()
        with pool.lock:
            pool._apps_wait_from(time.monotonic())
        return pool

    def test_apps_judged_to_wait_that_are_quick_keep_the_turn_again(self):
        pool = self.apps_judged_to_wait()
        for _ in range(4 * brim._QUICK_JOBS):
            self.serve_one(pool, 'a')
            if not pool.apps_wait():
                break
        self.assertFalse(pool.apps_wait())
        self.assertGreaterEqual(self.passed_before_app.count(True),
                                brim._QUICK_JOBS)
        self.serve_one(pool, 'a')
        self.assertEqual(self.passed_before_app[-1], False)

    def test_a_request_that_waits_starts_the_quick_count_again(self):
        pool = self.apps_judged_to_wait()
        quick = 'a' * (brim._QUICK_JOBS - 1)
        for kind in quick + 'A' + quick:
            self.serve_one(pool, kind)
        self.assertTrue(pool.apps_wait())
        self.assertEqual(self.passed_before_app,
                         [True] * (2 * brim._QUICK_JOBS - 1))

    def test_requests_quick_for_less_than_a_while_keep_the_judgement(self):
        pool = self.apps_judged_to_wait(quick_seconds=60.0)
        for _ in range(2 * brim._QUICK_JOBS):
            self.serve_one(pool, 'a')
        self.assertTrue(pool.apps_wait())

    def test_a_worker_ahead_of_its_sibling_leaves_it_new_connections(self):
        patch = unittest.mock.patch.object(brim, '_SPREAD_PAUSE', 60.0)
        patch.start()
        self.addCleanup(patch.stop)
        mine, sibling = _FakeBucket(), _FakeBucket()
        sibling.values.update(_pid=42, _open=1)     # accepts; none open
        sibling.beat = time.time() + 60             # beats throughout
        pool = self.pool(siblings=brim._Siblings(mine, [sibling]))
        self.assertEqual(mine.get('_open'), 1)  # accepting, none open
        taken = brim._SPREAD_MARGIN + 1     # then it is ahead
        for _ in range(taken + 3):
            self.client('p')                # stays open, idle
        wait_until(lambda: len(self.accepted_on) == taken)
        wait_until(lambda: len(pool.conns.parked) == taken)
        self.assertEqual(mine.get('_open'), taken + 1)
        # The rest wait in the backlog for the sibling, or for the pause
        # to end.
        self.assertFalse(pool.conns.accepting)
        self.assertGreater(pool.conns.paused_until, time.monotonic() + 30)
        self.assertEqual(len(self.accepted_on), taken)
        self.stop(pool)
        self.assertEqual(mine.get('_open'), 0)  # accepts no more

    def test_a_turn_no_thread_could_take_goes_to_the_next_free(self):
        pool = self.pool()
        start = threading.Thread.start

        def fail_once(thread):
            threading.Thread.start = start
            raise RuntimeError("can't start new thread")
        self.addCleanup(setattr, threading.Thread, 'start', start)
        with self.assertLogs('test', 'ERROR'):
            threading.Thread.start = fail_once
            self.client('w')        # passes the turn: no thread takes it
            wait_until(lambda: pool.unheld)
        self.client('q')
        self.released['w'].set()    # its thread takes the turn, serves q
        wait_until(lambda: 'q' in self.closed)

    def test_a_connection_parked_as_the_drain_begins_is_served(self):
        pool = self.pool()
        client = self.client('f')
        wait_until(lambda: pool.turn == 1)      # it stalled: turn passed
        os.write(self.stop_w, b'\0')
        wait_until(lambda: pool.stopping)
        self.released['f'].set()
        wait_until(lambda: pool.conns.parked)
        client.sendall(b'.')
        wait_until(lambda: self.closed == ['f'])

    def test_no_more_than_limit_connections_at_once(self):
        pool = self.pool(limit=1)
        self.client('w')
        wait_until(lambda: not pool.conns.accepting)
        self.client('q')
        self.assertEqual((pool.conns.open, len(self.accepted_on)), (1, 1))
        self.released['w'].set()
        wait_until(lambda: 'q' in self.closed)
        self.assertEqual(len(self.accepted_on), 2)

    def test_parked_connections_are_served_when_they_send(self):
        pool = self.pool(idle_timeout=0.3)
        parked = self.client('p')
        wait_until(lambda: pool.conns.parked)
        self.client('q')
        wait_until(lambda: 'q' in self.closed)
        parked.sendall(b'.')
        wait_until(lambda: 'p' in self.closed)
        self.assertEqual(len(set(thread for _k, thread in self.served)), 1)
        # Parked and silent: closed after idle_timeout.
        self.client('p')
        wait_until(lambda: self.closed.count('p') == 2)
        self.assertEqual(len(self.served_on('p')), 3)
        self.assertEqual(pool.conns.open, 0)

    def test_stop_closes_idle_connections_and_answers_new_ones(self):
        pool = self.pool()
        self.client('p')
        wait_until(lambda: pool.conns.parked)
        fresh = socket.create_connection(self.listener.getsockname(), 10)
        self.addCleanup(fresh.close)
        wait_until(lambda: len(self.accepted_on) == 2 and
                   len(pool.conns.parked) == 2)
        os.write(self.stop_w, b'\0')
        wait_until(lambda: self.closed == ['p'])
        self.assertEqual(self.listener.fileno(), -1)    # the port is free
        fresh.sendall(b'q')             # its first request is still served
        wait_until(lambda: self.closed == ['p', 'q'])
        self.assertEqual(pool.conns.open, 0)


# Apps that wait as an app waits on a database: on a barrier, a file.
APP_SOURCES['mywait.py'] = """
import os
import threading
import time

_barriers = {}
_lock = threading.Lock()


class Waits(object):
    \"\"\"/barrier?N&R: waits until N requests of round R are in (at most
    10 s); /hold: waits until the file "release" exists (at most 15 s);
    /fast answers at once.\"\"\"

    def __init__(self, name, conf, next_app):
        self.dir = conf.get(name, 'dir')
        self.next_app = next_app

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path == '/barrier':
            parties, _, rounds = env['QUERY_STRING'].partition('&')
            with _lock:
                barrier = _barriers.setdefault(
                    rounds, threading.Barrier(int(parties)))
            try:
                barrier.wait(10)
                body, status = b'together', '200 OK'
            except threading.BrokenBarrierError:
                body, status = b'alone', '504 Gateway Timeout'
        elif path == '/hold':
            with open(os.path.join(self.dir, 'holding'), 'a') as fp:
                fp.write('%d\\n' % os.getpid())
            release = os.path.join(self.dir, 'release')
            deadline = time.monotonic() + 15
            while not os.path.exists(release) and \\
                    time.monotonic() < deadline:
                time.sleep(0.005)
            body, status = b'held', '200 OK'
        elif path == '/fast':
            body, status = b'fast', '200 OK'
        else:
            return self.next_app(env, start_response)
        start_response(status, [('Content-Length', str(len(body)))])
        return [body]
"""


class TestWaitingApps(BrimTestCase):
    """A worker serves the requests of apps that wait side by side, and
    never holds a quick request behind one that waits."""

    def waits_conf(self, wsgi_extra=''):
        self.port = free_port()
        self.write_conf("""
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = 1
            apps = waits
            %s

            [waits]
            call = mywait.Waits
            dir = %s
            """ % (self.port, wsgi_extra, self.tmp))
        return live_children_of(self.start())[0]

    def holding(self):
        try:
            with open(os.path.join(self.tmp, 'holding')) as fp:
                return len(fp.read().split())
        except OSError:
            return 0

    def test_requests_that_wait_for_each_other_complete_together(self):
        """Ten requests that each wait until all ten are in: a worker that
        served them one after another would time every one out."""
        self.waits_conf()
        clients = [HTTPClient(self.port) for _ in range(10)]
        for client in clients:
            self.addCleanup(client.close)
        for round_ in ('fresh', 'kept-alive'):
            results = []

            def ask(client):
                results.append(client.request(
                    'GET', '/barrier?10&' + round_).body)
            threads = [threading.Thread(target=ask, args=(client,))
                       for client in clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            self.assertEqual(results, [b'together'] * 10, round_)

    def test_quick_requests_are_not_held_behind_one_that_waits(self):
        self.waits_conf()
        held = []
        holder = threading.Thread(target=lambda: held.append(
            self.http(self.port, 'GET', '/hold', timeout=30)))
        holder.start()
        self.addCleanup(holder.join, 30)
        self.addCleanup(lambda: open(os.path.join(self.tmp, 'release'),
                                     'w').close())
        wait_until(lambda: self.holding() == 1)
        client = HTTPClient(self.port, timeout=5)
        self.addCleanup(client.close)
        for _ in range(20):
            self.assertEqual(client.request('GET', '/fast').body, b'fast')
        for _ in range(5):
            self.assertEqual(self.http(self.port, 'GET', '/fast')[2],
                             b'fast')
        self.assertEqual(held, [], 'the held request ended early')
        open(os.path.join(self.tmp, 'release'), 'w').close()
        holder.join(30)
        self.assertEqual(held[0][::2], (200, b'held'))

    def test_threads_stay_within_concurrent_per_worker(self):
        worker = self.waits_conf('concurrent_per_worker = 4')
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            self.http(self.port, 'GET', '/hold', timeout=30)[::2]))
            for _ in range(10)]
        for thread in threads:
            thread.start()
        self.addCleanup(lambda: [thread.join(30) for thread in threads])
        self.addCleanup(lambda: open(os.path.join(self.tmp, 'release'),
                                     'w').close())
        wait_until(lambda: self.holding() == 4)
        # The main thread, the watch, the thread with the turn: 3 more.
        self.assertLessEqual(len(os.listdir('/proc/%d/task' % worker)), 7)
        open(os.path.join(self.tmp, 'release'), 'w').close()
        for thread in threads:
            thread.join(30)
        self.assertEqual(results, [(200, b'held')] * 10)
        self.assertLessEqual(len(os.listdir('/proc/%d/task' % worker)), 7)


def _proxy_v2(command=0x1, family=0x11, addresses=b'', tlvs=b''):
    """A PROXY protocol v2 header."""
    body = addresses + tlvs
    return (brim._PROXY_V2_SIGNATURE + bytes((0x20 | command, family)) +
            struct.pack('!H', len(body)) + body)


def _proxy_v2_inet(ip, port, tlvs=b''):
    return _proxy_v2(family=0x11, tlvs=tlvs, addresses=(
        socket.inet_aton(ip) + socket.inet_aton('127.0.0.1') +
        struct.pack('!HH', port, 8080)))


def _proxy_v2_inet6(ip, port):
    return _proxy_v2(family=0x21, addresses=(
        socket.inet_pton(socket.AF_INET6, ip) +
        socket.inet_pton(socket.AF_INET6, '::1') +
        struct.pack('!HH', port, 8080)))


#: (header, the client address it gives).
PROXY_HEADERS = [
    (b'PROXY TCP4 192.0.2.1 127.0.0.1 5555 8080\r\n', ('192.0.2.1', 5555)),
    (b'PROXY TCP6 2001:db8::1 ::1 6666 8080\r\n', ('2001:db8::1', 6666)),
    (b'PROXY UNKNOWN\r\n', None),
    (b'PROXY UNKNOWN ff::1 ::1 1 2\r\n', None),
    (_proxy_v2_inet('192.0.2.2', 7777), ('192.0.2.2', 7777)),
    (_proxy_v2_inet('192.0.2.3', 1, tlvs=b'\x04\x00\x03abc\x01\x00\x02h2'),
     ('192.0.2.3', 1)),
    (_proxy_v2_inet6('2001:db8::2', 8888), ('2001:db8::2', 8888)),
    (_proxy_v2(command=0x0, family=0x00), None),     # LOCAL: health checks
    (_proxy_v2(command=0x0, family=0x11, addresses=b'x' * 12), None),
]


class TestProxyProtocolHeader(unittest.TestCase):
    """The PROXY header's reader, over socketpairs in this process: it
    reads the header's bytes and not one more, however they arrive; and
    the allow lists that say whose header to read."""

    def pair(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        return ours, theirs

    def test_no_prefix_asks_for_more_than_the_header_has(self):
        for header, address in PROXY_HEADERS:
            for split in range(len(header)):
                need, _ = brim._proxy_header(header[:split])
                self.assertTrue(0 < need <= len(header) - split,
                                (header, split, need))
            self.assertEqual(brim._proxy_header(header), (0, address))

    def test_every_split_point_leaves_the_request(self):
        request = b'GET / HTTP/1.1\r\n\r\n'
        for header, address in PROXY_HEADERS:
            for split in range(1, len(header)):
                ours, theirs = self.pair()
                theirs.sendall(header[:split])
                rest = threading.Thread(target=theirs.sendall,
                                        args=(header[split:] + request,))
                rest.start()
                self.assertEqual(brim._read_proxy_header(ours, 5), address,
                                 (header, split))
                rest.join()
                self.assertEqual(ours.recv(100), request)

    def assert_refused(self, data, reason, close=True):
        ours, theirs = self.pair()
        theirs.sendall(data)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        with self.assertRaises(brim._ProxyError) as caught:
            brim._read_proxy_header(ours, 5)
        self.assertIn(reason, str(caught.exception), data)

    def test_truncated(self):
        for header, _ in PROXY_HEADERS:
            for split in (1, len(header) // 2, len(header) - 1):
                self.assert_refused(header[:split], 'closed before the '
                                    'header ended')
        self.assert_refused(b'', 'closed before a header')

    def test_malformed(self):
        request = b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
        self.assert_refused(request, 'no PROXY header', close=False)
        self.assert_refused(b'\r\n\r\n\0\r\nQUIT!', 'no PROXY header')
        for line in (b'PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n',
                     b'PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n',
                     b'PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n'):
            self.assert_refused(line, 'a malformed v1 header')
        for line in (b'PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n',
                     b'PROXY TCP4 ::1 ::1 1 2\r\n',
                     b'PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n',
                     b'PROXY TCP4 1.2.3.4 1.2.3.4 70000 2\r\n',
                     b'PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n',
                     b'PROXY TCP4 1.2.3.4 1.2.3.4 x 2\r\n'):
            self.assert_refused(line, 'bad addresses in a v1 header')
        self.assert_refused(b'PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n',
                            'bare LF')
        v2 = bytearray(_proxy_v2_inet('192.0.2.1', 1))
        v2[12] = 0x11
        self.assert_refused(bytes(v2), 'version 1, command 1')
        v2[12] = 0x22
        self.assert_refused(bytes(v2), 'version 2, command 2')
        self.assert_refused(_proxy_v2(family=0x41, addresses=b'x' * 12),
                            'family 0x4')
        self.assert_refused(_proxy_v2(family=0x21, addresses=b'x' * 12),
                            'too short for its addresses')

    def test_oversized(self):
        self.assert_refused(b'PROXY TCP4 ' + b'1' * 200, 'over 107 bytes',
                            close=False)
        self.assert_refused(brim._PROXY_V2_SIGNATURE + b'\x21\x11\xff\xff',
                            'over', close=False)

    def test_whom_the_allow_lists_trust(self):
        peers = brim._peers('wsgi', 'proxy_allow_ips',
                            '10.0.0.0/8, 192.0.2.7 2001:db8::/32')
        for address, trusted in ((('10.1.2.3', 80), True),
                                 (('192.0.2.7', 80), True),
                                 (('192.0.2.8', 80), False),
                                 (('127.0.0.1', 80), False),
                                 (('::ffff:10.0.0.1', 80, 0, 0), True),
                                 (('2001:db8::1', 80, 0, 0), True),
                                 (('::1', 80, 0, 0), False),
                                 ('', True), (None, True),   # Unix sockets
                                 ('/run/brim.sock', True)):
            self.assertIs(brim._trusted_peer(peers, address), trusted,
                          address)
        anyone = brim._peers('wsgi', 'forwarded_allow_ips', '*')
        self.assertTrue(brim._trusted_peer(anyone, ('203.0.113.1', 1)))
        self.assertTrue(brim._trusted_peer(anyone, ('2001:db8::1', 1, 0, 0)))
        with self.assertRaises(brim.ConfError) as caught:
            brim._peers('wsgi', 'proxy_allow_ips', '10.0.0.0/33')
        self.assertEqual(str(caught.exception),
                         "[wsgi] proxy_allow_ips: '10.0.0.0/33' is not an "
                         "address or a CIDR range.")

    def test_a_header_that_never_completes_times_out(self):
        ours, theirs = self.pair()
        theirs.sendall(b'PROXY TCP4 1.2.')
        with self.assertRaises(socket.timeout):
            brim._read_proxy_header(ours, 0.05)


class TestProxies(EchoTestCase):
    """Forwarded headers and PROXY headers, believed from the proxies the
    allow lists name, and from nobody else."""

    def peer(self, headers=None, data=None, port=None):
        """What /peer saw, sent as headers or as raw ``data``."""
        port = port or self.port
        if data is None:
            status, _h, body = self.http(port, 'GET', '/peer',
                                         headers=headers)
        else:
            answer = self.raw(port, data)
            status = int(answer.split(b' ', 2)[1])
            body = answer.partition(b'\r\n\r\n')[2]
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def logged_clients(self):
        """(client, remote address) of each request line, in order."""
        # After NOTICE: the txn, then the client and the remote address.
        return [tuple(line['line'].split(' NOTICE ')[1].split(' ')[1:3])
                for line in self.request_lines()]

    def test_forwarded_headers_from_a_trusted_proxy(self):
        self.echo_conf()
        self.start()
        seen = self.peer({'X-Forwarded-Proto': 'https',
                          'X-Forwarded-For': '203.0.113.9, 198.51.100.4'})
        self.assertEqual(seen['wsgi.url_scheme'], 'https')
        self.assertEqual(seen['HTTPS'], 'on')
        self.assertTrue(seen['request_uri'].startswith('https://'), seen)
        self.assertTrue(seen['application_uri'].startswith('https://'))
        # The right-most entry: the one the trusted proxy added.
        self.assertEqual(seen['brim.client_addr'], '198.51.100.4')
        self.assertEqual(seen['REMOTE_ADDR'], '127.0.0.1')
        seen = self.peer({'Forwarded': 'for=192.0.2.60;proto=http, '
                                       'for="[2001:db8::7]:4711";proto=https'})
        self.assertEqual((seen['wsgi.url_scheme'], seen['brim.client_addr']),
                         ('https', '2001:db8::7'))
        for name, value in (('X-Forwarded-Ssl', 'on'),
                            ('X-Forwarded-Protocol', 'https')):
            seen = self.peer({name: value})
            self.assertEqual(seen['wsgi.url_scheme'], 'https', name)
            self.assertEqual(seen['brim.client_addr'], '127.0.0.1')
        seen = self.peer({})
        self.assertEqual(seen['wsgi.url_scheme'], 'http')
        self.assertIsNone(seen['HTTPS'])
        self.assertTrue(seen['request_uri'].startswith('http://'), seen)
        # The log shows the client the proxy named, then the peer.
        wait_until(lambda: len(self.request_lines()) == 5)
        self.assertEqual(self.logged_clients()[:2], [
            ('198.51.100.4', '127.0.0.1'), ('2001:db8::7', '127.0.0.1')])

    def test_json_log_shows_the_forwarded_client(self):
        self.echo_conf(wsgi_extra='log_format = json')
        self.start()
        self.peer({'X-Forwarded-For': '203.0.113.9'})

        def request_line():
            for line in self.log_lines():
                if '"path": "/peer"' in line:
                    return json.loads(line)
        self.assertEqual(wait_until(request_line)['client'], '203.0.113.9')

    def test_forwarded_headers_from_anyone_else_change_nothing(self):
        self.echo_conf(wsgi_extra='forwarded_allow_ips = 10.0.0.0/8, '
                                  '192.168.0.0/16')
        self.start()
        seen = self.peer({'X-Forwarded-Proto': 'https',
                          'X-Forwarded-Ssl': 'on',
                          'Forwarded': 'for=192.0.2.1;proto=https',
                          'X-Forwarded-For': '203.0.113.9'})
        self.assertEqual(seen['wsgi.url_scheme'], 'http')
        self.assertIsNone(seen['HTTPS'])
        self.assertTrue(seen['request_uri'].startswith('http://'), seen)
        self.assertTrue(seen['application_uri'].startswith('http://'))
        self.assertEqual(seen['brim.client_addr'], '127.0.0.1')
        wait_until(lambda: self.request_lines())
        self.assertEqual(self.logged_clients(), [('127.0.0.1', '127.0.0.1')])

    def test_a_bad_allow_list_is_refused(self):
        for option in ('forwarded_allow_ips', 'proxy_allow_ips'):
            self.echo_conf(wsgi_extra='%s = 10.0.0.0/8 nonsense' % option)
            code, out, err = self.brim('start')
            self.assertEqual(code, 1, (out, err))
            self.assertIn("[wsgi] %s: 'nonsense' is not an address or a "
                          "CIDR range." % option, err)

    def test_proxy_protocol_from_an_allowed_peer(self):
        self.echo_conf(wsgi_extra='proxy_protocol = yes')
        self.start()
        request = (b'GET /peer HTTP/1.1\r\nHost: x\r\n'
                   b'Connection: close\r\n\r\n')
        expected = []
        for header, address in PROXY_HEADERS:
            seen = self.peer(data=header + request)
            ip, port = address or ('127.0.0.1', None)
            self.assertEqual(seen['REMOTE_ADDR'], ip, header)
            self.assertEqual(seen['brim.client_addr'], ip)
            if port:
                self.assertEqual(seen['REMOTE_PORT'], str(port))
            expected.append((ip, ip))
        wait_until(lambda: len(self.request_lines()) == len(expected))
        self.assertEqual(self.logged_clients(), expected)

    def test_an_allowed_peer_without_a_header_is_closed(self):
        self.echo_conf(wsgi_extra='proxy_protocol = yes')
        self.start()
        self.assertEqual(self.raw(self.port, b'GET /peer HTTP/1.1\r\n'
                                             b'Host: x\r\n\r\n'), b'')
        self.wait_for_log(r"WARNING .*\[wsgi\] closed the connection from "
                          r"127\.0\.0\.1:\d+: PROXY header: no PROXY header: "
                          r"b'GET /peer HTTP/'")
        # And it serves on.
        seen = self.peer(data=PROXY_HEADERS[0][0] + b'GET /peer HTTP/1.0\r\n'
                         b'\r\n')
        self.assertEqual(seen['REMOTE_ADDR'], '192.0.2.1')

    def test_proxy_header_from_anyone_else_is_not_believed(self):
        self.echo_conf(wsgi_extra='proxy_protocol = yes\n'
                                  'proxy_allow_ips = 10.0.0.0/8')
        self.start()
        answer = self.raw(self.port, PROXY_HEADERS[0][0] +
                          b'GET /peer HTTP/1.0\r\n\r\n')
        self.assertTrue(answer.startswith(b'HTTP/1.1 400 '), answer)
        seen = self.peer({})
        self.assertEqual(seen['REMOTE_ADDR'], '127.0.0.1')

    def haproxy(self, backend_port, server_options):
        """A haproxy in front of ``backend_port``, as a child stopped in a
        cleanup; the port it listens on."""
        if not shutil.which('haproxy'):
            self.skipTest('needs the Debian package haproxy')
        port = free_port()
        conf = os.path.join(self.tmp, 'haproxy-%d.cfg' % port)
        with open(conf, 'w') as fp:
            fp.write(textwrap.dedent('''
                defaults
                    mode tcp
                    timeout connect 5s
                    timeout client 10s
                    timeout server 10s
                frontend front
                    bind 127.0.0.1:%d
                    default_backend back
                backend back
                    server b 127.0.0.1:%d %s
                ''' % (port, backend_port, server_options)))
        proc = popen(['haproxy', '-f', conf, '-db'],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(end_process, proc)
        wait_until(lambda: proc.poll() is not None or
                   not connect_refused(port))
        self.assertIsNone(proc.poll(), 'haproxy exited')
        return port

    def test_behind_haproxy(self):
        self.echo_conf(wsgi_extra='proxy_protocol = yes')
        self.start()
        for options in ('send-proxy-v2', 'send-proxy'):
            port = self.haproxy(self.port, options)
            sock = socket.create_connection(('127.0.0.1', port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(b'GET /peer HTTP/1.0\r\n\r\n')
            answer = read_until_closed(sock)
            seen = json.loads(answer.partition(b'\r\n\r\n')[2])
            # haproxy's client is this socket: its port, not haproxy's.
            self.assertEqual((seen['REMOTE_ADDR'], seen['REMOTE_PORT']),
                             ('127.0.0.1', str(sock.getsockname()[1])),
                             options)

    def test_tcp_handler_sees_the_proxied_client(self):
        port = free_port()
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = mytcp.Peer
            proxy_protocol = yes
            ''' % port)
        self.start()
        self.assertEqual(tcp_exchange(port, PROXY_HEADERS[0][0]),
                         b'192.0.2.1 5555')
        self.assertEqual(tcp_exchange(port, _proxy_v2_inet6('2001:db8::2',
                                                            8888)),
                         b'2001:db8::2 8888')
        self.assertEqual(tcp_exchange(port, _proxy_v2(0, 0)).split()[0],
                         b'127.0.0.1')


class TestOutOfDescriptors(EchoTestCase):
    """A worker out of file descriptors closes its longest idle connections
    to take new ones; it is not recycled, nor restarted."""

    def test_idle_connections_give_way_to_new_ones(self):
        import resource
        self.echo_conf()

        def low_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        pid = self.start(preexec_fn=low_limit)
        [worker] = live_children_of(pid)
        idle = []
        for _ in range(300):
            sock = socket.create_connection(('127.0.0.1', self.port), 5)
            self.addCleanup(sock.close)
            idle.append(sock)
        self.wait_for_log('out of file descriptors')
        for _ in range(3):      # each on a new connection, behind the idle
            status, _headers, body = self.http(self.port, 'POST', '/echo',
                                               b'through', timeout=10)
            self.assertEqual((status, body), (200, b'through'))
        for sock in idle:
            sock.close()
        wait_until(lambda: self.log_lines() and self.http(
            self.port, 'POST', '/echo', b'x')[2] == b'x' and
            'to spare again' in self.log_text())
        log = self.log_text()
        self.assertEqual(log.count('out of file descriptors'), 1, log)
        self.assertEqual(live_children_of(pid), [worker],
                         'the worker was replaced')
        self.assertNotIn('recycling', log)
        self.assertNotIn('Exception ignored', log)


# Requests split the way TCP may split them, against brim's own parser:
# a socketpair, an _HTTPConnection and the little of a worker it uses.

class _HeldTurn(object):
    """The pool's turn, as a connection served here without a pool holds
    it: passing it on does nothing, and apps are not known to wait."""

    def pass_on(self):
        pass

    def before_app(self):
        return False


class _SeamWorker(object):
    """What a [wsgi] worker gives _HTTPConnection (an _HTTPSite), and what
    it is told back: brim's own reading, parsing and answering, in this
    process."""

    def __init__(self, app, max_request_line=8190, max_header_line=8190,
                 max_header_count=100, max_body=None, client_timeout=5.0):
        self.connections = set()
        self.records = []       # what brim logged
        self.answered = []      # (env, status, body bytes read) of each
        self.refused = []       # the status of each request refused
        self.draining = False
        self.logger = logging.Logger('seams')
        self.logger.propagate = False
        self.logger.addHandler(_KeptRecords(self.records))
        self.site = brim._HTTPSite(
            app=app, base_env={
                'SCRIPT_NAME': '', 'SERVER_NAME': '127.0.0.1',
                'SERVER_PORT': '80', 'wsgi.version': (1, 0),
                'wsgi.url_scheme': 'http', 'wsgi.input_terminated': True,
                'wsgi.errors': brim._ErrorStream(self.logger),
                'wsgi.multithread': True, 'wsgi.multiprocess': True,
                'wsgi.run_once': False,
                'wsgi.file_wrapper': brim._FileWrapper},
            parser=brim._RequestParser(brim._HTTPLimits(
                max_request_line, max_header_line, max_header_count,
                max_body, client_timeout)),
            logger=self.logger, tls=False, connections=self.connections,
            next_txn=lambda: 'txn', began=lambda *request: None,
            ended=self.ended, refused=self.refused.append,
            draining=lambda: self.draining)

    def ended(self, env, response, duration, txn):
        self.answered.append((env, response.code, response.bytes_in()))

    def errors(self):
        return [r.getMessage() for r in self.records
                if r.levelno >= logging.ERROR]


class _KeptRecords(logging.Handler):

    def __init__(self, records):
        logging.Handler.__init__(self)
        self.records = records

    def emit(self, record):
        self.records.append(record)


class _WatchedSocket(socket.socket):
    """brim's end of a socketpair (non-blocking, as brim makes a plain
    connection).  It counts what brim has read and says on a pipe when
    brim finds nothing more to read, so the client can send a piece
    only once brim has read the ones before and done all it can with
    them: each piece is then a read of its own, and what brim does with
    it does not depend on timing."""

    def __init__(self, sock, notify_fd):
        socket.socket.__init__(self, sock.family, sock.type,
                               fileno=sock.detach())
        self.notify_fd = notify_fd
        self.taken = 0
        self.waiting = False
        self.short_sends = 0    # sends the client could not take in full

    def send(self, data, flags=0):
        sent = socket.socket.send(self, data, flags)
        self.short_sends += sent < len(data)
        return sent

    def recv(self, size, flags=0):
        try:
            data = socket.socket.recv(self, size, flags)
        except BlockingIOError:     # brim has read all there is: it waits
            self.waits()
            raise
        self.waiting = False
        self.taken += len(data)
        return data

    def waits(self):
        self.waiting = True
        os.write(self.notify_fd, b'.')

    def waits_for(self, sent):
        """True once brim has read ``sent`` bytes and waits for more."""
        return self.waiting and self.taken >= sent


def _dump_app(env, start_response):
    """What brim parsed, canonically: the request's fields, then its whole
    body, read the way the path says (/ignore, /small, /lines, /iter, or
    else one read(); /late reads it after the response's head is out)."""
    body = env['wsgi.input']
    path = env['PATH_INFO']
    fields = [env['REQUEST_METHOD'], path, env['QUERY_STRING'],
              env['SERVER_PROTOCOL'],
              'CONTENT_LENGTH=%s' % env.get('CONTENT_LENGTH', '-'),
              'CONTENT_TYPE=%s' % env.get('CONTENT_TYPE', '-')]
    fields.extend(sorted('%s=%s' % item for item in env.items()
                         if item[0].startswith('HTTP_')))
    fields = '\n'.join(fields).encode('latin-1') + b'\n\n'
    if path == '/late':
        start_response('200 OK', [])(fields)
        return [body.read()]
    if path == '/ignore':
        data = b''
    elif path == '/small':
        data = b''.join(iter(lambda: body.read(3), b''))
    elif path == '/lines':
        data = b''.join(iter(lambda: body.readline(7), b''))
    elif path == '/iter':
        data = b''.join(body)
    else:
        data = body.read()
    start_response('200 OK', [('Content-Type', 'application/octet-stream')])
    return [fields + data]


class SplitClient(object):
    """brim's _HTTPConnection serving socketpairs (or, ``tcp``, loopback
    TCP connections) in a thread of its own, and a client that sends each
    a request in pieces.  ``heard``: what brim had answered as each piece
    of the latest exchange was sent."""

    def __init__(self, worker, timeout=5.0, tcp=False):
        self.worker = worker
        self.timeout = timeout
        self.tcp = tcp
        self.send_buffer = None     # brim's SO_SNDBUF, if set
        self.heard = []
        self.notify_r, self.notify_w = os.pipe()
        self.jobs = queue.Queue()
        self.served = None      # (the socket brim closed, an error or None)
        self.thread = threading.Thread(target=self._serve_each, daemon=True)
        self.thread.start()

    def close(self):
        self.jobs.put(None)
        self.thread.join(self.timeout)
        os.close(self.notify_r)
        os.close(self.notify_w)

    def _serve_each(self):
        for sock in iter(self.jobs.get, None):
            error = None
            try:
                self._serve(sock)
            except BaseException as err:
                error = err
                sock.close()
            self.served = (sock, error)
            os.write(self.notify_w, b'.')

    def _serve(self, sock):
        """As the pool serves a connection: the job returned is parked
        until the client sends more, then served again."""
        job = brim._HTTPConnection(self.worker.site, sock,
                                   ('127.0.0.1', 40000))
        self.worker.connections.add(job)
        job = job.serve(_HeldTurn())       # as from the accept
        while job is not None:
            while job.unsent is not None and not job.try_send_unsent():
                select.select([], [sock], [], self.timeout)
            sock.waits()
            if not select.select([sock], [], [], self.timeout)[0]:
                job.close()
                raise AssertionError('parked for %gs' % self.timeout)
            sock.waiting = False
            job = job.serve(_HeldTurn())

    def exchange(self, pieces):
        """Send ``pieces`` in turn on a new connection, each once brim
        waits for more, then half-close.  Returns every byte brim
        answered until it closed, Date masked, then ``<reset>`` if the
        connection was reset."""
        client, server = self._connection()
        if self.send_buffer:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                              self.send_buffer)
        server = _WatchedSocket(server, self.notify_w)
        self.served = None
        self.heard = []
        self.jobs.put(server)
        received = []
        deadline = time.monotonic() + self.timeout
        try:
            sent = 0
            for piece in pieces:
                if self.served is not None:
                    break       # brim closed: it wants no more
                self._take_arrived(client, received)
                self.heard.append(b''.join(received))
                client.sendall(piece)
                sent += len(piece)
                self._wait(client, received, deadline, lambda:
                           server.waits_for(sent) or
                           self.served is not None)
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._wait(client, received, deadline,
                       lambda: received[-1:] in ([b''], [b'<reset>']) and
                       self.served is not None)
        finally:
            client.close()
        if self.served[1] is not None:
            raise self.served[1]
        return re.sub(rb'\r\nDate: [^\r\n]*', b'\r\nDate: -',
                      b''.join(received))

    def _take_arrived(self, client, received):
        """Read what brim has answered so far, without waiting."""
        while (received[-1:] not in ([b''], [b'<reset>']) and
               select.select([client], [], [], 0)[0]):
            try:
                received.append(client.recv(65536))
            except ConnectionResetError:
                received.append(b'<reset>')

    def _connection(self):
        """(the client's socket, brim's) of a new connection."""
        if not self.tcp:
            return socket.socketpair()
        with socket.create_server(('127.0.0.1', 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _address = listener.accept()
        return client, server

    def _wait(self, client, received, deadline, done):
        """Read what brim answers until ``done()``."""
        while not done():
            ended = received[-1:] in ([b''], [b'<reset>'])
            ready = select.select([self.notify_r] + [client] * (not ended),
                                  [], [], max(deadline - time.monotonic(),
                                              0))[0]
            if not ready:
                raise AssertionError('brim neither waited for more nor '
                                     'closed within %gs' % self.timeout)
            if self.notify_r in ready:
                os.read(self.notify_r, 4096)
            if client in ready:
                try:
                    received.append(client.recv(65536))
                except ConnectionResetError:
                    received.append(b'<reset>')


def responses(data):
    """The statuses of the responses in ``data``, then 'garbled' if what
    follows them is not a response."""
    fp = io.BytesIO(data)
    statuses = []
    while True:
        try:
            response = read_response(fp)
        except (ValueError, IndexError):
            return statuses + ['garbled']
        if response is None:
            return statuses
        statuses.append(response.status)


def two_pieces(data):
    """``data`` cut in two at every byte boundary."""
    return [(data[:cut], data[cut:]) for cut in range(1, len(data))]


def byte_by_byte(data):
    return [data[i:i + 1] for i in range(len(data))]


def random_pieces(data, rng, cuts):
    """``data`` cut at ``cuts`` random places."""
    points = sorted(rng.sample(range(1, len(data)), min(cuts, len(data) - 1)))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def _chunked(path, chunks, head=b'', trailer=b''):
    return (b'POST ' + path + b' HTTP/1.1\r\nHost: x\r\n'
            b'Transfer-Encoding: chunked\r\n' + head + b'\r\n' +
            b''.join(chunks) + b'0\r\n' + trailer + b'\r\n')


def _post(path, body, head=b''):
    return (b'POST ' + path + b' HTTP/1.1\r\nHost: x\r\nContent-Length: %d'
            b'\r\n' % len(body) + head + b'\r\n' + body)


# (name, request bytes, the statuses brim answers with), for a worker with
# the limits of SPLIT_LIMITS.
SPLIT_LIMITS = {'max_request_line': 64, 'max_header_line': 80,
                'max_header_count': 8, 'max_body': 64}
SPLIT_REQUESTS = [
    ('get', b'GET /a%20b?c=d HTTP/1.1\r\nHost: x\r\nX-Two: a\r\n'
     b'X-Two: b\r\n\r\n', [200]),
    ('one stray CRLF first', b'\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n',
     [200]),
    ('content-length', _post(b'/', b'hello\nworld',
                             b'Content-Type: text/plain\r\n'), [200]),
    ('content-length, read by 3', _post(b'/small', b'hello\nworld'), [200]),
    ('content-length, read by lines', _post(b'/lines', b'he\nllo\nwo\n\nr'),
     [200]),
    ('chunked, extensions and a trailer',
     _chunked(b'/lines', [b'5;a=b\r\nhe\nll\r\n', b'6 ; q="x;\\"y" ; r\r\n'
                          b'o\nworl\r\n', b'1\r\nd\r\n'],
              trailer=b'X-Trailer: t\r\nX-More: m\r\n'), [200]),
    ('chunked, read by 3', _chunked(b'/small', [b'a\r\n0123456789\r\n',
                                               b'2\r\nab\r\n']), [200]),
    ('chunked, iterated', _chunked(b'/iter', [b'4\r\na\nb\n\r\n',
                                             b'3\r\n\ncd\r\n']), [200]),
    ('chunked, empty', _chunked(b'/', []), [200]),
    ('expect 100-continue', _post(b'/', b'body!',
                                  b'Expect: 100-continue\r\n'), [100, 200]),
    ('expect 100-continue, chunked',
     _chunked(b'/', [b'3\r\nabc\r\n'], b'Expect: 100-continue\r\n'),
     [100, 200]),
    ('expect 100-continue, empty chunked',
     _chunked(b'/', [], b'Expect: 100-continue\r\n'), [100, 200]),
    ('expect 100-continue, no body', _post(b'/', b'',
                                          b'Expect: 100-continue\r\n') +
     b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', [200, 200]),
    ('expect 100-continue, body read after the head',
     _post(b'/late', b'body!', b'Expect: 100-continue\r\n'), [200]),
    ('expect 100-continue, body not read',
     _post(b'/ignore', b'body!', b'Expect: 100-continue\r\n') +
     b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', [200]),
    ('absolute-form targets',
     b'GET http://example.com?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n'
     b'GET http://example.com:8080?x HTTP/1.1\r\nHost: x\r\n\r\n'
     b'GET http://example.com#f HTTP/1.1\r\nHost: x\r\n\r\n', [200] * 3),
    ('pipeline', _post(b'/', b'one') + _chunked(b'/small', [b'3\r\ntwo\r\n'])
     + b'GET /three HTTP/1.1\r\nHost: x\r\n\r\n' + _post(b'/lines', b'f\nour')
     + b'GET /five HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
     b'GET /never HTTP/1.1\r\nHost: x\r\n\r\n', [200] * 5),
    ('pipeline, a CRLF after a body', _post(b'/', b'one') +
     b'\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n', [200, 200]),
    ('pipeline, bodies not read', _post(b'/ignore', b'one') +
     _post(b'/ignore', b'x' * 60) +
     _chunked(b'/ignore', [b'3\r\nabc\r\n']) +
     b'GET /never HTTP/1.1\r\nHost: x\r\n\r\n', [200] * 3),
    ('HTTP/1.0 ends the connection', b'GET / HTTP/1.0\r\n\r\n'
     b'GET /never HTTP/1.1\r\nHost: x\r\n\r\n', [200]),
    ('HTTP/1.0 keep-alive', b'GET / HTTP/1.0\r\nConnection: keep-alive\r\n'
     b'\r\nGET / HTTP/1.0\r\n\r\n', [200, 200]),
    ('bare LF in the head', b'GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n',
     [400]),
    ('bare LF ends the head', b'GET / HTTP/1.1\nHost: x\n\n', [400]),
    ('bare CR in the head', b'GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n',
     [400]),
    ('two stray CRLFs', b'\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n',
     [400]),
    ('obs-fold', b'GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n', [400]),
    ('NUL in a field', b'GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n',
     [400]),
    ('request line too long', b'GET /' + b'a' * 70 + b' HTTP/1.1\r\n'
     b'Host: x\r\n\r\n', [414]),
    ('request line too long, no end', b'GET /' + b'a' * 70, [414]),
    ('field too long', b'GET / HTTP/1.1\r\nHost: x\r\nX: ' + b'v' * 80 +
     b'\r\n\r\n', [431]),
    ('too many fields', b'GET / HTTP/1.1\r\n' + b'X: y\r\n' * 9 + b'\r\n',
     [431]),
    ('body over max_body', _post(b'/', b'b' * 65), [413]),
    ('chunked over max_body', _chunked(b'/', [b'41\r\n' + b'c' * 65 +
                                             b'\r\n']), [413]),
    ('bad chunk size', _chunked(b'/', [b'0x5\r\nhello\r\n']), [400]),
    ('chunk size too big', _chunked(b'/', [b'1' * 17 + b'\r\nx\r\n']), [400]),
    ('bare LF after a chunk size', _chunked(b'/', [b'5\nhello\r\n']), [400]),
    ('chunk without its CRLF', _chunked(b'/', [b'5\r\nhelloX\r\n']), [400]),
    ('chunk line at its limit', _chunked(b'/', [b'5;' + b'e' * 1022 +
                                               b'\r\nhello\r\n']), [200]),
    ('chunk line over its limit', _chunked(b'/', [b'5;' + b'e' * 1023 +
                                                 b'\r\nhello\r\n']), [400]),
    ('forbidden trailer', _chunked(b'/', [b'1\r\na\r\n'],
                                   trailer=b'Content-Length: 1\r\n'), [400]),
    ('chunked body cut short', _chunked(b'/', [b'5\r\nhel'])[:-5], [400]),
    ('content-length body cut short', _post(b'/', b'hello')[:-2], [400]),
    ('head cut short', b'GET / HTTP/1.1\r\nHost:', [400]),
    ('bad second request', b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
     b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n'
     b'Content-Length: 1\r\n\r\nx', [200, 400]),
]


def corpus_requests():
    """[(name, bytes)] of the request corpus, or a reason it is absent."""
    folder = os.environ.get('BRIM_HTTP_CORPUS') or os.path.join(
        HERE, '..', 'shared', 'http-corpus', 'gunicorn')
    found = []
    for kind in ('valid', 'invalid'):
        try:
            names = sorted(os.listdir(os.path.join(folder, kind)))
        except OSError:
            continue
        for name in names:
            if name.endswith('.http'):
                with open(os.path.join(folder, kind, name), 'rb') as fp:
                    found.append(('%s/%s' % (kind, name),
                                  decode_corpus_request(fp.read())))
    if not found:
        raise unittest.SkipTest(
            'no request corpus in %s (valid/*.http, invalid/*.http); set '
            'BRIM_HTTP_CORPUS to its folder' % os.path.abspath(folder))
    return found


_CORPUS_ESCAPE = re.compile(rb'\\(?:r|n|t|0|x[0-9A-Fa-f]{2})')
_CORPUS_BYTES = {b'\\r': b'\r', b'\\n': b'\n', b'\\t': b'\t', b'\\0': b'\0'}


def decode_corpus_request(text):
    """The bytes a corpus .http file stands for: its newlines only wrap
    the text; \\r \\n \\t \\0 and \\xHH are the bytes they name."""
    return _CORPUS_ESCAPE.sub(
        lambda m: _CORPUS_BYTES.get(m.group()) or
        bytes([int(m.group()[2:], 16)]), text.replace(b'\n', b''))


class TestHTTPSegmentation(unittest.TestCase):
    """A request gets the same answer however TCP splits it."""

    def split_client(self, **limits):
        client = SplitClient(_SeamWorker(_dump_app, **limits))
        self.addCleanup(client.close)
        return client

    def assert_same_answer(self, client, name, data, splits):
        whole = client.exchange([data])
        for pieces in splits:
            answer = client.exchange(pieces)
            if answer != whole:
                self.fail('%s: sent as %r, brim answered\n%r\nnot, as to '
                          'the request in one piece,\n%r'
                          % (name, list(pieces), answer, whole))
        self.assertEqual(client.worker.errors(), [], name)
        return whole

    def splits(self, data, rng):
        """Two pieces cut at every byte boundary, when ``data`` is short,
        else at random ones, and then one byte per piece."""
        if len(data) <= 256:
            splits = two_pieces(data)
        else:
            splits = [random_pieces(data, rng, cuts)
                      for cuts in [1] * 24 + [2, 3, 5, 8, 13, 40]]
        return splits + [byte_by_byte(data)]

    def test_every_split_of_each_request(self):
        client = self.split_client(**SPLIT_LIMITS)
        rng = random.Random(9112)
        for name, data, statuses in SPLIT_REQUESTS:
            whole = self.assert_same_answer(client, name, data,
                                            self.splits(data, rng))
            self.assertEqual(responses(whole), statuses,
                             '%s: %r' % (name, whole))

    def test_corpus(self):
        requests = corpus_requests()
        client = self.split_client(max_request_line=4094)
        rng = random.Random(9112)
        for name, data in requests:
            splits = self.splits(data, rng) if len(data) <= 1024 else \
                [random_pieces(data, rng, cuts) for cuts in (1, 2, 3, 40)]
            self.assert_same_answer(client, name, data, splits)


# brim's HTTP path in this process, over socketpairs or loopback TCP: what
# a brimd would answer, without starting one.

class _Closing(object):
    """A body that notes in ``closed`` that its close() was called."""

    def __init__(self, closed, name):
        self.closed = closed
        self.name = name

    def __iter__(self):
        yield b'part1-'
        yield b'part2'

    def close(self):
        self.closed.append(self.name)


class _FramingApp(object):
    """/echo answers with the body, /gen with a generator, /write through
    write(), /here with bytes and /list with a list (neither a list nor a
    length), /closing?NAME with a body whose close() it notes, /closed with
    the names closed so far, /pid with this process's id; /raise raises;
    other paths get brimd's own 404."""

    def __init__(self):
        self.closed = []

    def __call__(self, env, start_response):
        handler = getattr(self, 'do_' + env['PATH_INFO'][1:], None)
        if handler is None:
            return brim.WSGISubserver._not_found(env, start_response)
        return handler(env, start_response)

    def reply(self, start_response, body):
        start_response('200 OK', [('Content-Type', 'text/plain'),
                                  ('Content-Length', str(len(body)))])
        return [body]

    def do_echo(self, env, start_response):
        return self.reply(start_response, env['wsgi.input'].read())

    def do_pid(self, env, start_response):
        return self.reply(start_response, str(os.getpid()).encode())

    def do_here(self, env, start_response):
        body = b'Hello World!\n'
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return body

    def do_list(self, env, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'a list', b' body']

    def do_gen(self, env, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return (part for part in (b'hello', b' world'))

    def do_write(self, env, start_response):
        write = start_response('200 OK', [('Content-Length', '11')])
        write(b'hello ')
        return [b'world']

    def do_closing(self, env, start_response):
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return _Closing(self.closed, env['QUERY_STRING'])

    def do_closed(self, env, start_response):
        return self.reply(start_response, ','.join(self.closed).encode())

    def do_raise(self, env, start_response):
        raise ValueError('app-raised-marker')


# Ends a pipeline: brim answers it, then closes.
LAST_REQUEST = b'GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'


class InProcessHTTPTestCase(unittest.TestCase):
    """brim's _HTTPConnection serving ``self.app`` (make_app()) in this
    process, with ``limits``; over loopback TCP if ``tcp``, else over
    socketpairs."""

    limits = {}
    tcp = False

    def setUp(self):
        self.framing = _FramingApp()
        self.app = self.make_app()
        self.worker = _SeamWorker(self.app, **self.limits)
        self.client = SplitClient(self.worker, tcp=self.tcp)
        self.addCleanup(self.client.close)

    def make_app(self):
        return self.framing

    def exchange(self, *pieces, methods=()):
        """Send ``pieces`` in turn on a new connection, each once brim
        waits for more, and read the responses until brim closes, the
        first ones to ``methods``, the rest to GET: ([Response], whether
        the connection was reset)."""
        data = self.client.exchange(pieces)
        reset = data.endswith(b'<reset>')
        fp = io.BytesIO(data[:-len(b'<reset>')] if reset else data)
        answers = []
        for method in itertools.chain(methods, itertools.repeat('GET')):
            answer = read_response(fp, method)
            if answer is None:
                return answers, reset
            answers.append(answer)

    def assert_logged(self, pattern):
        lines = [r.getMessage() for r in self.worker.records]
        self.assertTrue(any(re.search(pattern, line) for line in lines),
                        'nothing logged matches %r: %r' % (pattern, lines))

    def assert_nothing_logged(self):
        self.assertEqual([r.getMessage() for r in self.worker.records
                          if r.levelno >= logging.WARNING], [])


class TestHTTPFraming(InProcessHTTPTestCase):
    """Pipelining, keep-alive, bodies in every framing, HEAD, 100-continue
    and the WSGI calling conventions."""

    def test_pipelined_requests(self):
        answers, reset = self.exchange(
            b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none'
            b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo'
            b'GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
            b'GET /never HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertFalse(reset)
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, b'one'), (200, b'two'),
                          (404, b'404 Not Found\n')])
        self.assertEqual(answers[2].headers['connection'], 'close')

    def test_answers_held_back_for_the_pool(self):
        keep = b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n'
        for turn, request, held in ((_HeldTurn(), keep, True),
                                    (None, keep, False),
                                    (_HeldTurn(), LAST_REQUEST, False)):
            client, server = socket.socketpair()
            self.addCleanup(client.close)
            server.setblocking(False)
            conn = brim._HTTPConnection(self.worker.site, server,
                                        ('127.0.0.1', 40000))
            client.sendall(request)
            job = conn.serve(turn)
            client.setblocking(False)
            try:
                answer = client.recv(4096)
            except BlockingIOError:
                answer = None
            if held:    # until the pool sends it: then it is all sent
                self.assertIsNone(answer)
                self.assertIs(job, conn)
                self.assertTrue(conn.unsent.startswith(b'HTTP/1.1 200 OK'))
                self.assertTrue(conn.try_send_unsent())
                self.assertIsNone(conn.unsent)
                answer = client.recv(4096)
            self.assertTrue(answer.endswith(str(os.getpid()).encode()),
                            answer)
            conn.close()

    def test_woken_with_nothing_to_read_it_parks_again(self):
        # epoll may report bytes the connection has read already
        client, server = socket.socketpair()
        self.addCleanup(client.close)
        server.setblocking(False)
        conn = brim._HTTPConnection(self.worker.site, server,
                                    ('127.0.0.1', 40000))
        client.sendall(b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertIs(conn.serve(_HeldTurn()), conn)
        self.assertTrue(conn.try_send_unsent())
        began = time.monotonic()
        self.assertIs(conn.serve(_HeldTurn()), conn)
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertEqual(len(self.worker.answered), 1)
        client.sendall(b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertIs(conn.serve(_HeldTurn()), conn)
        self.assertEqual(len(self.worker.answered), 2)
        conn.close()

    def test_an_answer_held_back_the_client_cannot_take_at_once(self):
        body = b'x' * (brim._HOLD_MAX - 1024)   # held back, whole
        self.client.send_buffer = 16384
        answers, reset = self.exchange(
            b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n'
            % len(body) + body, LAST_REQUEST)
        self.assertFalse(reset)
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, body), (200, str(os.getpid()).encode())])
        self.assertGreater(self.client.served[0].short_sends, 0)

    def test_head(self):
        answers, reset = self.exchange(
            b'HEAD /here HTTP/1.1\r\nHost: x\r\n\r\n'
            b'HEAD /list HTTP/1.1\r\nHost: x\r\n\r\n' + LAST_REQUEST,
            methods=['HEAD', 'HEAD'])
        self.assertFalse(reset)
        self.assertEqual([a.status for a in answers], [200] * 3)
        self.assertEqual(answers[0].headers['content-length'], '13')
        self.assertEqual(answers[1].headers['content-length'], '11')
        self.assertTrue(answers[2].body.isdigit(), answers[2].body)

    def test_expect_100_continue(self):
        answers, _reset = self.exchange(
            b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n'
            b'Expect: 100-continue\r\n\r\n', b'Just a test.')
        self.assertEqual(self.client.heard[1],
                         b'HTTP/1.1 100 Continue\r\n\r\n')
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(100, b''), (200, b'Just a test.')])

    def test_expect_100_continue_body_nobody_reads(self):
        # A client that took the answer and sends its next request, not
        # the body, does not get it read as the body: the connection ends.
        answers, _reset = self.exchange(
            b'POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n'
            b'Expect: 100-continue\r\n\r\n',
            b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual([(a.status, a.headers.get('connection'))
                          for a in answers], [(404, 'close')])

    def test_chunked_request_body(self):
        answers, _reset = self.exchange(
            b'POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked'
            b'\r\n\r\n5\r\nJust \r\n7;ext=1\r\na test.\r\n0\r\n\r\n')
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, b'Just a test.')])
        self.assertEqual(answers[0].headers['content-length'], '12')

    def test_chunked_response(self):
        data = self.client.exchange([b'GET /gen HTTP/1.1\r\nHost: x\r\n'
                                     b'Connection: close\r\n\r\n'])
        head, _, body = data.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 200 '), data)
        self.assertIn(b'\r\nTransfer-Encoding: chunked', head)
        self.assertNotIn(b'Content-Length', head)
        self.assertEqual(body, b'5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n')

    def test_generator_on_http10_closes(self):
        data = self.client.exchange([b'GET /gen HTTP/1.0\r\n\r\n'])
        head, _, body = data.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 200 '), data)
        self.assertNotIn(b'chunked', head)
        self.assertEqual(body, b'hello world')

    def test_http10_without_keep_alive_closes(self):
        answers, _reset = self.exchange(b'GET /pid HTTP/1.0\r\n\r\n',
                                        b'GET /pid HTTP/1.0\r\n\r\n')
        self.assertEqual([a.status for a in answers], [200])
        self.assertTrue(answers[0].body.isdigit())

    def test_http10_keep_alive_on_request(self):
        answers, _reset = self.exchange(
            b'GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n',
            b'GET /pid HTTP/1.0\r\n\r\n')
        self.assertEqual([a.status for a in answers], [200, 200])
        self.assertEqual(answers[0].headers.get('connection', '').lower(),
                         'keep-alive')
        self.assertEqual(answers[1].body, answers[0].body)

    def test_write_callable(self):
        answers, _reset = self.exchange(b'GET /write HTTP/1.1\r\nHost: x\r\n'
                                        b'\r\n')
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, b'hello world')])
        self.assertEqual(answers[0].headers['content-length'], '11')

    def test_iterable_close_called_once(self):
        # Each body is closed once, before the next request is served.
        answers, _reset = self.exchange(
            b'GET /closing?a HTTP/1.1\r\nHost: x\r\n\r\n',
            b'GET /closing?b HTTP/1.1\r\nHost: x\r\n\r\n',
            b'GET /closed HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual([a.body for a in answers],
                         [b'part1-part2', b'part1-part2', b'a,b'])
        self.assertEqual(self.framing.closed, ['a', 'b'])

    def test_app_that_raises(self):
        answers, _reset = self.exchange(
            b'GET /raise HTTP/1.1\r\nHost: x\r\n\r\n',
            b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual([(a.status, a.headers.get('connection'), a.body)
                          for a in answers],
                         [(500, 'close',
                           b'500 Internal Server Error\ntxn txn\n')])
        self.assertEqual(answers[0].headers['content-type'], 'text/plain')
        self.assert_logged(r'GET /raise: the app raised: app-raised-marker')


class TestHTTPRefusals(InProcessHTTPTestCase):
    """Requests brim refuses; the server keeps serving after each."""

    limits = {'max_request_line': 100, 'max_header_count': 5,
              'max_body': 10}

    def refused(self, request, status):
        data = self.client.exchange([request])
        self.assertTrue(data.startswith(b'HTTP/1.1 %d ' % status), data)
        head, _, body = data.partition(b'\r\n\r\n')
        self.assertIn(b'\r\nConnection: close', head)
        self.assertTrue(body.startswith(b'%d ' % status), body)
        self.assert_still_serves()
        self.assert_logged(r'refused %d' % status)
        # Counted, whether refused as it was parsed or as its body was read.
        self.assertIn(status, self.worker.refused + [
            code for _env, code, _bytes_in in self.worker.answered])
        return data

    def assert_still_serves(self):
        answers, _reset = self.exchange(_post(b'/echo', b'small'))
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, b'small')])

    def test_content_length_and_transfer_encoding(self):
        self.refused(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r'
                     b'\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400)

    def test_bad_content_length(self):
        self.refused(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: '
                     b'abc\r\n\r\n', 400)

    def test_negative_content_length(self):
        self.refused(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: '
                     b'-1\r\n\r\n', 400)

    def test_bare_lf(self):
        self.refused(b'GET /echo HTTP/1.1\nHost: x\n\n', 400)

    def test_unsupported_version(self):
        self.refused(b'GET /echo HTTP/2.0\r\nHost: x\r\n\r\n', 505)

    def test_request_line_too_long(self):
        self.refused(b'GET /' + b'a' * 200 + b' HTTP/1.1\r\nHost: x\r\n\r\n',
                     414)

    def test_too_many_headers(self):
        headers = b''.join(b'X-H%d: v\r\n' % i for i in range(8))
        self.refused(b'GET /echo HTTP/1.1\r\nHost: x\r\n' + headers +
                     b'\r\n', 431)

    def test_body_over_max_body(self):
        self.refused(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 20'
                     b'\r\n\r\n' + b'b' * 20, 413)

    def test_chunked_body_over_max_body(self):
        data = self.refused(b'POST /echo HTTP/1.1\r\nHost: x\r\n'
                            b'Transfer-Encoding: chunked\r\n\r\n14\r\n' +
                            b'c' * 20 + b'\r\n0\r\n\r\n', 413)
        self.assertNotIn(b'c' * 11, data)


# Middleware as frameworks have it, and every shape of response to HEAD.

def _read_some(env, start_response):
    """Reads QUERY_STRING bytes of the body (all of it if empty) and
    answers with them."""
    body = env['wsgi.input']
    want = env['QUERY_STRING']
    if want:
        data = body.read(int(want)) if int(want) else b''
    else:
        data = b''.join(iter(lambda: body.read(4096), b''))
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', str(len(data)))])
    return [data]


class _InputWrapper(object):
    """A stream around wsgi.input with only what WSGI promises."""

    def __init__(self, stream):
        self.read = stream.read


class _Seams(object):
    """/validated, /replaced, /wrapped and /partial answer with the body
    read by _read_some behind the middleware each names; /shape?KIND
    answers GET and HEAD in the way KIND says."""

    def __init__(self, next_app):
        self.next_app = next_app
        self.validated = wsgiref_validator(_read_some)

    def __call__(self, env, start_response):
        handler = getattr(self, 'do_' + env['PATH_INFO'][1:], None)
        if handler is None:
            return self.next_app(env, start_response)
        return handler(env, start_response)

    def do_validated(self, env, start_response):
        return self.validated(env, start_response)

    def do_replaced(self, env, start_response):
        env['wsgi.input'] = io.BytesIO(env['wsgi.input'].read())
        return _read_some(env, start_response)

    def do_wrapped(self, env, start_response):
        env['wsgi.input'] = _InputWrapper(env['wsgi.input'])
        return _read_some(env, start_response)

    def do_partial(self, env, start_response):
        return _read_some(env, start_response)

    def do_shape(self, env, start_response):
        kind = env['QUERY_STRING']
        head = env['REQUEST_METHOD'] == 'HEAD'
        headers = [('Content-Type', 'text/plain'), ('X-Shape', kind)]
        if kind == 'sized':
            headers.append(('Content-Length', '5'))
        write = start_response('200 OK', headers)
        if kind == 'list':
            return [b'a list', b' body']
        if kind == 'generator':
            return (part for part in (b'gener', b'ated'))
        if kind == 'streamed':
            # As Werkzeug answers: GET streams, HEAD gets no body at all.
            return () if head else (part for part in (b'stre', b'amed'))
        if kind == 'sized':
            return [] if head else [b'sized']
        if kind == 'write':
            write(b'written')
            return []
        if kind == 'file':
            return env['wsgi.file_wrapper'](open(__file__, 'rb'))
        raise ValueError(kind)


class SeamsTestCase(InProcessHTTPTestCase):
    """_Seams in front of _FramingApp, over loopback TCP: a connection
    closed with input unread would be reset, as a brimd's would."""

    tcp = True

    def make_app(self):
        return _Seams(self.framing)


def post(path, body, chunked=False):
    """A POST of ``body``, framed by Content-Length or chunked."""
    if not chunked:
        return _post(path, body)
    return _chunked(path, [b'%x\r\n%s\r\n' % (len(body[i:i + 1000]),
                                               body[i:i + 1000])
                           for i in range(0, len(body), 1000)])


class TestHTTPMiddleware(SeamsTestCase):
    """Middleware that replaces wsgi.input or reads part of the body: brim
    drains the body it framed, or its answer says Connection: close, and
    it closes without resetting the connection."""

    def assert_kept_alive(self, path, body, answer, chunked=False):
        answers, reset = self.exchange(post(path, body, chunked) +
                                       LAST_REQUEST)
        self.assertFalse(reset, path)
        self.assertEqual([(a.status, a.headers.get('connection'))
                          for a in answers], [(200, None), (200, 'close')],
                         path)
        self.assertEqual(answers[0].body, answer, path)
        self.assertTrue(answers[1].body.isdigit(), path)

    def assert_closed(self, path, body, answer, chunked=False):
        answers, reset = self.exchange(post(path, body, chunked) +
                                       LAST_REQUEST)
        self.assertFalse(reset, path)
        self.assertEqual([(a.status, a.headers.get('connection'))
                          for a in answers], [(200, 'close')], path)
        self.assertEqual(answers[0].body, answer, path)

    def test_wsgiref_validator(self):
        body = b'0123456789' * 10
        for chunked in (False, True):
            self.assert_kept_alive(b'/validated', body, body, chunked)
        self.assert_kept_alive(b'/validated?3', body, b'012')
        self.assert_closed(b'/validated?3', body, b'012', chunked=True)
        self.assert_kept_alive(b'/validated?0', body, b'')
        self.assert_nothing_logged()

    def test_stream_put_in_place_of_wsgi_input(self):
        body = b'0123456789' * 10
        for chunked in (False, True):
            self.assert_kept_alive(b'/replaced', body, body, chunked)
            self.assert_kept_alive(b'/wrapped', body, body, chunked)
        self.assert_kept_alive(b'/wrapped?3', body, b'012')
        self.assert_nothing_logged()
        # The request line's bytes in counts the body brim read, not what
        # the replacement stream says.
        self.assertEqual([bytes_in for env, _status, bytes_in
                          in self.worker.answered
                          if env['PATH_INFO'] == '/replaced'], [100, 100])

    def test_body_read_in_part(self):
        small = b'x' * (brim._SKIP_LIMIT - 3)
        self.assert_kept_alive(b'/partial?3', b'abc' + small, b'abc')
        self.assert_closed(b'/partial?3', b'abc' + small, b'abc',
                           chunked=True)
        # Too much to drain: brim says it closes, and lets the client
        # send the rest and read the answer before it does.
        large = b'y' * (4 * brim._SKIP_LIMIT)
        for chunked in (False, True):
            self.assert_closed(b'/partial?3', b'abc' + large, b'abc',
                               chunked)
        self.assert_nothing_logged()


class TestHTTPClose(SeamsTestCase):
    """brim ends a connection with input unread without resetting it: the
    client reads the whole answer."""

    def test_refused_with_a_large_body_on_its_way(self):
        body = b'z' * (1 << 20)
        answers, reset = self.exchange(
            b'POST /partial HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n'
            b'Content-Length: %d\r\n\r\n' % len(body) + body)
        self.assertFalse(reset)
        self.assertEqual([(a.status, a.headers.get('connection'), a.body)
                          for a in answers],
                         [(400, 'close', b'400 Bad Request\n')])


class TestDrainClosesIdleConnections(unittest.TestCase):
    """A drain ends keep-alive connections between requests, and a request
    that arrives just as it does is never run for an answer that cannot
    be sent (the client would retry it: a POST would run twice)."""

    def test_a_request_that_meets_the_drain_is_not_run(self):
        paths = []

        def app(env, start_response):
            paths.append(env['PATH_INFO'])
            start_response('200 OK', [('Content-Length', '2')])
            return [b'ok']
        worker = _SeamWorker(app)
        with socket.create_server(('127.0.0.1', 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            served, address = listener.accept()
        self.addCleanup(client.close)
        self.addCleanup(served.close)
        conn = brim._HTTPConnection(worker.site, served, address)
        worker.connections.add(conn)
        client.sendall(b'POST /first HTTP/1.1\r\nHost: x\r\n'
                       b'Content-Length: 0\r\n\r\n')
        self.assertIs(conn.serve(), conn)       # answered; parked, idle
        self.assertTrue(conn.idle)
        client.sendall(b'POST /second HTTP/1.1\r\nHost: x\r\n'
                       b'Content-Length: 0\r\n\r\n')
        self.assertTrue(select.select([served], [], [], 5)[0])
        # The drain closes it with the request in its buffer, unread.
        brim.WSGISubserver._close_idle(
            types.SimpleNamespace(connections=worker.connections))
        self.assertIsNone(conn.serve())
        self.assertEqual(paths, ['/first'])
        client.settimeout(5)
        answers = read_until_closed(client)
        self.assertEqual(answers.count(b'HTTP/1.1 200'), 1)
        # A connection in the middle of a request is left to finish.
        busy = types.SimpleNamespace(idle=False, closing=False)
        brim.WSGISubserver._close_idle(
            types.SimpleNamespace(connections=[busy]))
        self.assertFalse(busy.closing)


    def test_an_answer_held_back_is_sent_before_the_drain_closes(self):
        worker = _SeamWorker(_FramingApp())
        client, served = socket.socketpair()
        self.addCleanup(client.close)
        served.setblocking(False)
        conn = brim._HTTPConnection(worker.site, served, ('127.0.0.1', 1))
        worker.connections.add(conn)
        client.sendall(b'GET /pid HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertIs(conn.serve(_HeldTurn()), conn)
        self.assertIsNotNone(conn.unsent)
        # Not idle until the pool has sent it: the drain leaves it.
        self.assertFalse(conn.idle)
        drain = types.SimpleNamespace(connections=worker.connections)
        brim.WSGISubserver._close_idle(drain)
        self.assertFalse(conn.closing)
        self.assertTrue(conn.try_send_unsent())
        self.assertTrue(conn.idle)
        brim.WSGISubserver._close_idle(drain)
        self.assertTrue(conn.closing)
        client.settimeout(5)
        answer = read_response(io.BytesIO(read_until_closed(client)))
        self.assertEqual(answer.body, str(os.getpid()).encode())
        conn.close()


class TestHTTPHead(SeamsTestCase):
    """HEAD gets GET's head, whatever shape of body the app answers with,
    and the connection goes on."""

    def test_every_shape(self):
        for kind in (b'list', b'generator', b'streamed', b'sized', b'write',
                     b'file'):
            ask = b'%%s /shape?%s HTTP/1.1\r\nHost: x\r\n\r\n' % kind
            answers, reset = self.exchange(
                ask % b'HEAD' + ask % b'GET' + ask % b'HEAD' + LAST_REQUEST,
                methods=['HEAD', 'GET', 'HEAD'])
            self.assertFalse(reset, kind)
            self.assertEqual([a.status for a in answers], [200] * 4, kind)
            head, get, again = [{name: value for name, value
                                 in answer.headers.items() if name != 'date'}
                                for answer in answers[:3]]
            self.assertEqual(again, head, kind)
            if kind == b'streamed':
                # GET's size is only known as it is sent; HEAD's answer,
                # with no body, leaves it unsaid rather than say 0.
                del get['transfer-encoding']
            self.assertEqual(head, get, kind)
            self.assertTrue(answers[3].body.isdigit(), kind)


class TestRequestTargets(unittest.TestCase):
    """What brim makes of a request-target."""

    def test_absolute_form(self):
        client = SplitClient(_SeamWorker(_dump_app))
        self.addCleanup(client.close)
        for target, path, query in (
                (b'http://example.com?x=1', '/', 'x=1'),
                (b'http://example.com:8080?x', '/', 'x'),
                (b'HTTPS://example.com#frag', '/', ''),
                (b'http://u@example.com/a/b?c#d', '/a/b', 'c')):
            answer = client.exchange([b'GET %s HTTP/1.1\r\nHost: x\r\n'
                                      b'\r\n' % target])
            self.assertTrue(answer.startswith(b'HTTP/1.1 200 '), answer)
            self.assertIn(b'\r\n\r\nGET\n%s\n%s\nHTTP/1.1\n'
                          % (path.encode(), query.encode()), answer)


# ---------------------------------------------------------------------------
# 9. The apps and helpers that ship with brim: brim.http, brim.httpform,
#    WSGIFS, WSGIBasicAuth and the live stats page
# ---------------------------------------------------------------------------

# Apps that use brim.http and brim.httpform, as an app author would.
APP_SOURCES['myforms.py'] = '''
import hashlib
import importlib
import json
import resource

from brim.http import HTTPBadRequest, HTTPForbidden
from brim.httpform import FormInvalid, iter_form, parse_attrs


def _peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Forms(object):
    """/form: a summary of each part; /forbidden raises HTTPForbidden;
    /whoami tells what reached it past an auth app."""

    def __init__(self, name, conf, next_app):
        self.next_app = next_app
        self.read_size = conf

    @classmethod
    def parse_conf(cls, name, conf):
        return conf.get_int(name, 'read_size', 65536)

    def __call__(self, env, start_response):
        path = env['PATH_INFO']
        if path == '/forbidden':
            raise HTTPForbidden()
        if path == '/whoami':
            body = json.dumps([env.get('REMOTE_USER'),
                               'HTTP_AUTHORIZATION' in env]).encode()
        elif path == '/form':
            body = json.dumps(self.summary(env)).encode()
        else:
            return self.next_app(env, start_response)
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]

    def summary(self, env):
        before = _peak_kib()
        parts = []
        try:
            for headers, part in iter_form(env, read_size=self.read_size):
                _value, attrs = parse_attrs(headers['content-disposition'])
                digest = hashlib.sha256()
                size = 0
                for data in iter(lambda: part.read(self.read_size), b''):
                    digest.update(data)
                    size += len(data)
                parts.append([attrs.get('name'), attrs.get('filename'),
                              size, digest.hexdigest()])
        except FormInvalid as err:
            raise HTTPBadRequest('%s\\n' % err)
        return {'parts': parts, 'peak_growth_kib': _peak_kib() - before}
'''


class FakeInput(object):
    """A wsgi.input that makes its body as it is read: ``pieces`` yields
    bytes; nothing more than one piece is ever held here."""

    def __init__(self, pieces):
        self.pieces = iter(pieces)
        self.pending = b''
        self.reads = 0

    def read(self, size):
        self.reads += 1
        while not self.pending:
            self.pending = next(self.pieces, None)
            if self.pending is None:
                self.pending = b''
                return b''
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


def form_env(body, boundary='b0undary', content_type=None):
    """A WSGI environ with a multipart/form-data ``body`` (bytes or an
    iterable of bytes)."""
    pieces = [body] if isinstance(body, bytes) else body
    return {'CONTENT_TYPE': content_type or
            'multipart/form-data; boundary=%s' % boundary,
            'wsgi.input': FakeInput(pieces)}


def form_body(parts, boundary='b0undary'):
    """A multipart/form-data body: ``parts`` is [(header lines, data)]."""
    out = b''
    for lines, data in parts:
        out += b'--' + boundary.encode() + b'\r\n'
        out += b''.join(line.encode() + b'\r\n' for line in lines)
        out += b'\r\n' + data + b'\r\n'
    return out + b'--' + boundary.encode() + b'--\r\n'


def read_form(env, **kwargs):
    """[(headers, data)] of every part, each read to its end."""
    return [(headers, part.read())
            for headers, part in brim.iter_form(env, **kwargs)]


class StartResponse(object):
    """A start_response that keeps what it was given."""

    def __call__(self, status, headers, exc_info=None):
        self.status = status
        self.headers = dict(headers)


class TestHTTPHelpers(BrimTestCase):
    """brim.http: status classes, raising a response, quote, dates."""

    def test_status_classes_answer_their_status(self):
        from brim.http import HTTPException
        import brim.http
        names = [n for n in brim._SUBMODULES['brim.http']
                 if n.startswith('HTTP') and n != 'HTTPException']
        self.assertGreater(len(names), 25)
        for name in names:
            cls = getattr(brim.http, name)
            self.assertTrue(issubclass(cls, HTTPException), name)
            start = StartResponse()
            body = b''.join(cls()({'REQUEST_METHOD': 'GET'}, start))
            self.assertEqual(int(start.status[:3]), cls.code, name)
            if cls.code in (204, 304):
                self.assertEqual(body, b'', name)
                self.assertNotIn('Content-Length', start.headers)
            else:
                self.assertEqual(body, start.status.encode() + b'\n', name)
                self.assertEqual(start.headers['Content-Length'],
                                 str(len(body)))
        # Every response class in brim.py is importable from brim.http.
        defined = {n for n, v in vars(brim).items()
                   if isinstance(v, type) and issubclass(v, HTTPException)}
        self.assertEqual(defined, set(names) | {'HTTPException'})
        start = StartResponse()
        body = brim.http.HTTPMovedPermanently(
            'gone there', {'Location': '/there'})({}, start)
        self.assertEqual((start.status, start.headers['Location'], body),
                         ('301 Moved Permanently', '/there',
                          [b'gone there']))
        self.assertEqual(str(brim.http.HTTPNotFound()), '404 Not Found')

    def test_quote_and_dates(self):
        from brim.http import http_date, parse_http_date, quote
        self.assertEqual(quote('/a b/caf\u00e9?'), '/a%20b/caf%C3%A9%3F')
        self.assertEqual(http_date(784111777),
                         'Sun, 06 Nov 1994 08:49:37 GMT')
        for text in ('Sun, 06 Nov 1994 08:49:37 GMT',
                     'Sunday, 06-Nov-94 08:49:37 GMT',
                     'Sun Nov  6 08:49:37 1994'):
            self.assertEqual(parse_http_date(text), 784111777, text)
        for text in (None, '', 'yesterday', 'Sun, 06 Nov 99999 08:49 GMT'):
            self.assertIsNone(parse_http_date(text), text)

    def test_raised_response_is_the_answer(self):
        port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = forms

            [forms]
            call = myforms.Forms
            ''' % port)
        self.start()
        conn = httpclient.HTTPConnection('127.0.0.1', port, timeout=10)
        try:
            for _ in range(2):      # the connection stays usable
                conn.request('GET', '/forbidden')
                resp = conn.getresponse()
                self.assertEqual((resp.status, resp.read()),
                                 (403, b'403 Forbidden\n'))
        finally:
            conn.close()
        self.assertNotIn('Traceback', self.log_text())


class TestHTTPForm(BrimTestCase):
    """brim.httpform: parse_attrs, and iter_form streaming parts."""

    def test_parse_attrs(self):
        parse = brim.httpform.parse_attrs
        self.assertEqual(parse('form-data; name="a"; filename="b.txt"'),
                         ('form-data', {'name': 'a', 'filename': 'b.txt'}))
        self.assertEqual(parse('Form-Data;NAME="x;y \\"z\\"\\\\";n=plain;'),
                         ('form-data', {'name': 'x;y "z"\\', 'n': 'plain'}))
        self.assertEqual(
            parse("form-data; filename=\"caf\"; filename*=utf-8''caf%C3%A9"),
            ('form-data', {'filename': 'caf\u00e9'}))
        self.assertEqual(parse('text/plain'), ('text/plain', {}))
        for bad in ('form-data; name="unterminated',
                    'form-data; name', "form-data; filename*=nope''%ff"):
            with self.assertRaises(brim.httpform.FormInvalid, msg=bad):
                parse(bad)

    def test_bodies_built_by_the_email_package(self):
        import base64
        import email.mime.application
        import email.mime.multipart
        import email.mime.text
        import email.policy
        binary = bytes(range(256)) * 40 + b'\r\n--not-the-boundary\r\n--'
        form = email.mime.multipart.MIMEMultipart('form-data')
        text = email.mime.text.MIMEText('h\u00e9llo\r\nthere', 'plain',
                                        'utf-8')
        text.add_header('Content-Disposition', 'form-data', name='greeting')
        form.attach(text)
        upload = email.mime.application.MIMEApplication(binary)
        upload.add_header('Content-Disposition', 'form-data', name='file',
                          filename='d\u00e9j\u00e0 "vu".bin')
        form.attach(upload)
        body = form.as_bytes(policy=email.policy.HTTP)
        body = body.split(b'\r\n\r\n', 1)[1]     # past the message head
        for read_size in (1, 7, 65536):
            env = form_env(body, content_type=form['Content-Type'])
            parts = read_form(env, read_size=read_size)
            self.assertEqual(len(parts), 2)
            (first, data1), (second, data2) = parts
            self.assertEqual(brim.parse_attrs(first['content-disposition']),
                             ('form-data', {'name': 'greeting'}))
            self.assertEqual(base64.b64decode(data1).decode('utf-8'),
                             'h\u00e9llo\r\nthere')
            self.assertEqual(brim.parse_attrs(second['content-disposition']),
                             ('form-data', {'name': 'file',
                                            'filename': 'd\u00e9j\u00e0 '
                                                        '"vu".bin'}))
            self.assertEqual(base64.b64decode(data2), binary)

    def test_reading_by_size_and_line_and_skipping(self):
        body = form_body([
            (['Content-Disposition: form-data; name="lines"'],
             b'one\r\ntwo\nthree'),
            (['Content-Disposition: form-data; name="skipped"'], b'x' * 999),
            ([], b'no headers'),
            (['Content-Disposition: form-data; name="empty"'], b'')])
        parts = brim.iter_form(form_env(body), read_size=4)
        headers, part = next(parts)
        self.assertEqual(headers, {'content-disposition':
                                   'form-data; name="lines"'})
        self.assertEqual(list(part), [b'one\r\n', b'two\n', b'three'])
        self.assertEqual(part.read(), b'')
        headers, part = next(parts)
        self.assertEqual(part.read(2), b'xx')
        headers, part = next(parts)     # the rest of "skipped" is skipped
        self.assertEqual((headers, part.readline(3), part.read()),
                         ({}, b'no ', b'headers'))
        headers, part = next(parts)
        self.assertEqual(part.read(), b'')
        self.assertEqual(list(parts), [])

    def test_malformed_bodies(self):
        ok = [(['Content-Disposition: form-data; name="a"'], b'data')]
        no_boundary = 'multipart/form-data'
        long_boundary = 'multipart/form-data; boundary=' + 'b' * 71
        cases = [
            ('not multipart', form_env(form_body(ok),
                                       content_type='text/plain')),
            ('boundary', form_env(form_body(ok), content_type=no_boundary)),
            ('boundary', form_env(form_body(ok), content_type=long_boundary)),
            ('ended inside', form_env(b'')),
            ('ended inside', form_env(form_body(ok)[:-30])),
            ('bad part header', form_env(form_body([(['no colon'], b'')]))),
            ('bad part header', form_env(form_body(
                [(['A: b', ' folded: line'], b'')]))),
            ('two content-disposition', form_env(form_body(
                [(['Content-Disposition: a', 'content-disposition: b'],
                  b'')]))),
            ('followed by', form_env(b'--b0undary junk\r\n\r\nx\r\n'
                                     b'--b0undary--')),
            ('more than 2 parts', form_env(form_body(ok * 3)),
             {'max_parts': 2}),
            ('header is over 100', form_env(form_body(
                [(['X-Long: ' + 'x' * 200], b'')])), {'max_header_size': 100}),
            ('over max_part_size', form_env(form_body(
                [([], b'x' * 101)])), {'max_part_size': 100}),
        ]
        for case in cases:
            reason, env = case[:2]
            kwargs = case[2] if len(case) > 2 else {}
            with self.assertRaises(brim.httpform.FormInvalid, msg=reason) \
                    as caught:
                read_form(env, read_size=16, **kwargs)
            self.assertIn(reason, str(caught.exception))

    def test_fifty_megabytes_in_bounded_memory(self):
        import hashlib
        import tracemalloc
        boundary = 'fifty-boundary'
        # Data that keeps nearly matching the delimiter, a megabyte a piece.
        block = (b'\r\n--fifty-boundar' + bytes(range(256)) * 16) * 256
        block = block[:1 << 20]
        expected = hashlib.sha256()

        def pieces():
            yield (b'--' + boundary.encode() + b'\r\nContent-Disposition: '
                   b'form-data; name="big"; filename="big.bin"\r\n\r\n')
            for _ in range(50):
                expected.update(block)
                yield block
            yield b'\r\n--' + boundary.encode() + b'--\r\n'
        env = form_env(pieces(), boundary=boundary)
        tracemalloc.start()
        try:
            started = time.monotonic()
            got = hashlib.sha256()
            size = 0
            for headers, part in brim.iter_form(env, read_size=1 << 20):
                for data in iter(lambda: part.read(1 << 20), b''):
                    got.update(data)
                    size += len(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual((size, got.hexdigest()),
                         (50 << 20, expected.hexdigest()))
        self.assertLess(peak, 8 << 20, 'held %d bytes at once' % peak)
        self.assertLess(time.monotonic() - started, 10)

    def form_server(self, read_size=1 << 20):
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = forms

            [forms]
            call = myforms.Forms
            read_size = %d
            ''' % (self.port, read_size))
        self.start()

    def test_streamed_upload_to_brimd(self):
        import hashlib
        self.form_server()
        self.assertEqual(self.http(self.port, 'GET', '/whoami')[0], 200)
        block = os.urandom(1 << 20)
        head = (b'--b0undary\r\nContent-Disposition: form-data; name="f"; '
                b'filename="upload.bin"\r\n\r\n')
        tail = b'\r\n--b0undary--\r\n'
        total = len(head) + (50 << 20) + len(tail)

        def body():
            yield head
            for _ in range(50):
                yield block
            yield tail
        conn = httpclient.HTTPConnection('127.0.0.1', self.port, timeout=30)
        try:
            conn.putrequest('POST', '/form')
            conn.putheader('Content-Type',
                           'multipart/form-data; boundary=b0undary')
            conn.putheader('Content-Length', str(total))
            conn.endheaders()
            for data in body():
                conn.send(data)
            resp = conn.getresponse()
            status, reply = resp.status, resp.read()
        finally:
            conn.close()
        self.assertEqual(status, 200, reply)
        summary = json.loads(reply.decode())
        expected = hashlib.sha256()
        for _ in range(50):
            expected.update(block)
        self.assertEqual(summary['parts'], [
            ['f', 'upload.bin', 50 << 20, expected.hexdigest()]])
        # The worker's peak memory grew by far less than the upload.
        self.assertLess(summary['peak_growth_kib'], 16 << 10, summary)

    def test_curl_upload(self):
        import hashlib
        curl = shutil.which('curl')
        if curl is None:
            self.skipTest('no curl on this machine')
        self.form_server(read_size=4096)
        path = os.path.join(self.tmp, 'caf\u00e9 x.bin')
        data = os.urandom(300000)
        with open(path, 'wb') as fp:
            fp.write(data)
        code, out, err = run([curl, '-sS', '-F', 'note=hello there',
                              '-F', 'upload=@%s' % path,
                              'http://127.0.0.1:%d/form' % self.port])
        self.assertEqual((code, err), (0, ''))
        self.assertEqual(json.loads(out)['parts'], [
            ['note', None, 11, hashlib.sha256(b'hello there').hexdigest()],
            ['upload', 'caf\u00e9 x.bin', len(data),
             hashlib.sha256(data).hexdigest()]])
        code, out, err = run([curl, '-sS', '-H', 'Content-Type: text/plain',
                              '--data-binary', 'x',
                              'http://127.0.0.1:%d/form' % self.port])
        self.assertIn('not multipart/form-data', out)


class TestWSGIFS(BrimTestCase):
    """WSGIFS serves files under serve_path and nothing outside it."""

    def setUp(self):
        BrimTestCase.setUp(self)
        self.www = os.path.join(self.tmp, 'www')
        self.files = {
            'hello.txt': b'hello, world\n',
            'hundred.bin': bytes(range(100)),
            'empty.txt': b'',
            'sub/index.html': b'<p>the index</p>\n',
            'list/<b>&"odd name.txt': b'odd',
            'list/b.txt': b'bb',
            'list/zdir/x': b'x',
            'list/adir/y': b'y',
        }
        for name, data in self.files.items():
            path = os.path.join(self.www, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as fp:
                fp.write(data)
        with open(os.path.join(self.tmp, 'secret.txt'), 'wb') as fp:
            fp.write(b'the-secret-marker')
        os.symlink(os.path.join(self.tmp, 'secret.txt'),
                   os.path.join(self.www, 'list', 'outside-link'))
        os.symlink(self.tmp, os.path.join(self.www, 'outside-dir'))
        os.symlink('hello.txt', os.path.join(self.www, 'inside-link'))
        os.mkfifo(os.path.join(self.www, 'fifo'))

    def fs_server(self, extra=''):
        self.port, self.admin = free_port(), free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = fs echo

            [wsgi#admin]
            ip = 127.0.0.1
            port = %d
            apps = stats

            [fs]
            call = brim.wsgi_fs.WSGIFS
            path = /files
            serve_path = %s
            %s

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (self.port, self.admin, self.www, extra))
        self.start()

    def get(self, path, headers=None, method='GET'):
        return self.http(self.port, method, path, headers=headers)

    def test_get_and_head(self):
        self.fs_server()
        status, headers, body = self.get('/files/hello.txt')
        self.assertEqual((status, body), (200, self.files['hello.txt']))
        self.assertEqual(headers['content-type'], 'text/plain')
        self.assertEqual(headers['content-length'], '13')
        mtime = os.stat(os.path.join(self.www, 'hello.txt')).st_mtime
        self.assertEqual(brim.parse_http_date(headers['last-modified']),
                         int(mtime))
        self.assertRegex(headers['etag'], r'^"[0-9a-f]+-d"$')
        self.assertEqual(headers['accept-ranges'], 'bytes')
        head = self.get('/files/hello.txt', method='HEAD')
        self.assertEqual((head[0], head[2]), (200, b''))
        self.assertEqual({k: v for k, v in head[1].items() if k != 'date'},
                         {k: v for k, v in headers.items() if k != 'date'})
        self.assertEqual(self.get('/files/empty.txt')[:3:2], (200, b''))
        self.assertEqual(self.get('/files/inside-link')[2],
                         self.files['hello.txt'])
        for method in ('POST', 'PUT', 'DELETE'):
            status, headers, _body = self.get('/files/hello.txt',
                                              method=method)
            self.assertEqual((status, headers['allow']), (405, 'GET, HEAD'))
        # Other paths go on down the chain.
        self.echo_ok(self.port)
        self.assertEqual(self.get('/filesystem')[0], 404)
        self.assertEqual(self.get('/files/missing')[0], 404)
        self.assertEqual(self.get('/files/hello.txt/')[0], 404)
        # A FIFO would block an open() for reading: it is not served.
        self.assertEqual(self.get('/files/fifo')[0], 404)

    def test_conditional_requests(self):
        self.fs_server()
        _status, headers, _body = self.get('/files/hello.txt')
        etag, modified = headers['etag'], headers['last-modified']
        for condition in ({'If-None-Match': etag},
                          {'If-None-Match': '"other", W/%s' % etag},
                          {'If-None-Match': '*'},
                          {'If-Modified-Since': modified},
                          {'If-Modified-Since': brim.http_date(
                              time.time() + 60)}):
            status, headers, body = self.get('/files/hello.txt', condition)
            self.assertEqual((status, body), (304, b''), condition)
            self.assertEqual(headers['etag'], etag)
        for condition in ({'If-None-Match': '"other"'},
                          {'If-None-Match': '"other"',
                           'If-Modified-Since': modified},
                          {'If-Modified-Since': 'Sun, 06 Nov 1994 08:49:37 '
                                                'GMT'},
                          {'If-Modified-Since': 'not a date'}):
            status, _headers, body = self.get('/files/hello.txt', condition)
            self.assertEqual((status, body), (200, self.files['hello.txt']),
                             condition)

    def test_ranges(self):
        self.fs_server()
        data = self.files['hundred.bin']
        etag = self.get('/files/hundred.bin')[1]['etag']
        cases = [
            ('bytes=0-9', 206, 0, 9), ('bytes=90-', 206, 90, 99),
            ('bytes=-10', 206, 90, 99), ('bytes=95-200', 206, 95, 99),
            ('bytes=-200', 206, 0, 99), ('BYTES = 5 - 5', 206, 5, 5),
            ('bytes=99-99', 206, 99, 99),
            ('bytes=100-', 416, None, None), ('bytes=100-200', 416, None,
                                              None),
            ('bytes=-0', 416, None, None),
            ('bytes=5-2', 200, 0, 99), ('bytes=0-1,5-6', 200, 0, 99),
            ('items=0-1', 200, 0, 99), ('bytes=abc', 200, 0, 99),
            ('bytes=-', 200, 0, 99), ('bytes=' + '9' * 30 + '-', 200, 0, 99),
        ]
        for spec, code, first, last in cases:
            status, headers, body = self.get('/files/hundred.bin',
                                             {'Range': spec})
            self.assertEqual(status, code, spec)
            if code == 416:
                self.assertEqual(headers['content-range'], 'bytes */100')
                continue
            self.assertEqual(body, data[first:last + 1], spec)
            self.assertEqual(headers['content-length'],
                             str(last - first + 1))
            if code == 206:
                self.assertEqual(headers['content-range'],
                                 'bytes %d-%d/100' % (first, last), spec)
            else:
                self.assertNotIn('content-range', headers)
        status, _headers, body = self.get(
            '/files/hundred.bin', {'Range': 'bytes=10-19', 'If-Range': etag})
        self.assertEqual((status, body), (206, data[10:20]))
        status, _headers, body = self.get(
            '/files/hundred.bin', {'Range': 'bytes=10-19',
                                   'If-Range': '"stale"'})
        self.assertEqual((status, body), (200, data))
        self.assertEqual(self.get('/files/empty.txt',
                                  {'Range': 'bytes=0-'})[0], 416)

    def test_large_file_goes_out_with_sendfile(self):
        import hashlib
        path = os.path.join(self.www, 'large.bin')
        block = os.urandom(1 << 20)
        with open(path, 'wb') as fp:
            for _ in range(64):
                fp.write(block)
        self.fs_server()
        pid = [w['pid'] for w in self.stats(self.admin)['workers']
               if w['subserver'] == 'wsgi'][0]
        peak_before = self.peak_memory(pid)
        status, headers, body = self.get('/files/large.bin')
        self.assertEqual((status, len(body)), (200, 64 << 20))
        self.assertEqual(hashlib.sha256(body).digest(),
                         hashlib.sha256(block * 64).digest())
        status, headers, body = self.get(
            '/files/large.bin', {'Range': 'bytes=%d-' % ((63 << 20) + 5)})
        self.assertEqual((status, body), (206, block[5:]))
        # Sent by the kernel from the page cache, not read into the worker.
        self.assertLess(self.peak_memory(pid) - peak_before, 16 << 20)

    @staticmethod
    def peak_memory(pid):
        """The process's peak resident memory in bytes (VmHWM)."""
        with open('/proc/%d/status' % pid) as fp:
            for line in fp:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        raise AssertionError('no VmHWM for %d' % pid)

    def test_directories(self):
        self.fs_server()
        for path, location in (('/files', '/files/'),
                               ('/files/sub', '/files/sub/'),
                               ('/files//sub', '/files/sub/')):
            status, headers, _body = self.get(path)
            self.assertEqual((status, headers['location']), (301, location))
        status, headers, body = self.get('/files/sub/')
        self.assertEqual((status, body), (200, self.files['sub/index.html']))
        self.assertEqual(headers['content-type'], 'text/html')
        status, headers, body = self.get('/files/list/')
        self.assertEqual(status, 200)
        self.assertEqual(headers['content-type'], 'text/html; charset=utf-8')
        page = body.decode('utf-8')
        self.assertIn('Index of /files/list/', page)
        links = re.findall(r'<a href="([^"]*)">([^<]*)</a>', page)
        self.assertEqual(links, [
            ('../', '../'), ('adir/', 'adir/'), ('zdir/', 'zdir/'),
            ('%3Cb%3E%26%22odd%20name.txt', '&lt;b&gt;&amp;&quot;odd '
                                            'name.txt'),
            ('b.txt', 'b.txt')])
        self.assertNotIn('<b>', page)
        self.assertNotIn('outside-link', page)     # leads outside
        self.assertRegex(page, r'b\.txt</a></td><td>2</td><td>\d{4}-\d\d-\d\d')
        status, _headers, body = self.get('/files/list/%3Cb%3E%26%22odd%20'
                                          'name.txt')
        self.assertEqual((status, body), (200, b'odd'))
        self.assertNotIn('../', self.get('/files/')[2].decode())

    def test_nothing_outside_serve_path(self):
        self.fs_server()
        forbidden = [
            '/files/../secret.txt', '/files/%2e%2e/secret.txt',
            '/files/%2E%2E/secret.txt', '/files/.%2e/secret.txt',
            '/files/..%2fsecret.txt', '/files/..%2Fsecret.txt',
            '/files/..\\secret.txt', '/files/..%5csecret.txt',
            '/files/sub/../../secret.txt', '/files/sub/%2e%2e/%2e%2e/'
            'secret.txt', '/files/..', '/files/../',
            'http://127.0.0.1/files/../secret.txt']
        missing = [
            '/files//' + os.path.join(self.tmp, 'secret.txt').lstrip('/'),
            '/files/%2f' + os.path.join(self.tmp,
                                        'secret.txt').lstrip('/'),
            '/files/%252e%252e/secret.txt', '/files/list/outside-link',
            '/files/outside-dir/secret.txt', '/files/outside-dir/',
            '/files/outside-dir']
        for path, code in [(p, 403) for p in forbidden] + \
                [(p, 404) for p in missing] + [('/files/%00', 400),
                                               ('/files/a%00b', 400)]:
            reply = self.raw(self.port, b'GET ' + path.encode() +
                             b' HTTP/1.1\r\nHost: x\r\nConnection: close'
                             b'\r\n\r\n')
            self.assertTrue(reply.startswith(b'HTTP/1.1 %d ' % code),
                            '%s: %r' % (path, reply[:80]))
            self.assertNotIn(b'the-secret-marker', reply, path)

    def test_serve_path_checked_at_start(self):
        self.port = free_port()
        for serve_path, message in (
                (None, '[fs] serve_path must be set'),
                (os.path.join(self.tmp, 'nowhere'),
                 '[fs] serve_path %s is not a readable directory' %
                 os.path.join(self.tmp, 'nowhere')),
                (os.path.join(self.www, 'hello.txt'),
                 'is not a readable directory')):
            self.write_conf('''
                [wsgi]
                ip = 127.0.0.1
                port = %d
                apps = fs

                [fs]
                call = brim.wsgi_fs.WSGIFS
                %s
                ''' % (self.port, 'serve_path = %s' % serve_path
                       if serve_path else ''))
            code, out, err = self.brim('start')
            self.track(self.read_pid())
            self.assertEqual(code, 1, out)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(message, err)

    def test_path_default_serves_from_the_root(self):
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = fs

            [fs]
            call = brim.wsgi_fs.WSGIFS
            serve_path = %s
            ''' % (self.port, self.www))
        self.start()
        self.assertEqual(self.get('/hello.txt')[2], self.files['hello.txt'])
        self.assertEqual(self.get('/sub/')[2], self.files['sub/index.html'])
        self.assertIn(b'hundred.bin', self.get('/')[2])
        self.assertEqual(self.get('/sub')[1]['location'], '/sub/')
        self.assertEqual(self.get('/../secret.txt')[0], 403)


AUTH_CONF = '''
[wsgi]
ip = 127.0.0.1
port = %(port)d
apps = auth forms

[auth]
call = brim.wsgi_basic_auth.WSGIBasicAuth
auth_path = %(auth_path)s
realm = Test "Realm"
check_interval = 0.1

[forms]
call = myforms.Forms
'''


class TestWSGIBasicAuth(BrimTestCase):
    """WSGIBasicAuth, and the hash-password command that feeds it."""

    def hash_line(self, name, password):
        proc = popen([sys.executable, BRIM, 'hash-password', name],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(password.encode() + b'\n',
                                        timeout=30)
        finally:
            _protected.discard(proc.pid)
        self.assertEqual((proc.returncode, err), (0, b''))
        return out.decode()

    def write_users(self, text):
        """Replace the auth file in one step, as an editor's save does."""
        tmp = self.auth_path + '.tmp'
        with open(tmp, 'w') as fp:
            fp.write(text)
        os.rename(tmp, self.auth_path)

    def auth_server(self, users):
        self.port = free_port()
        self.auth_path = os.path.join(self.tmp, 'users')
        self.write_users(users)
        self.write_conf(AUTH_CONF % {'port': self.port,
                                     'auth_path': self.auth_path})
        self.start()

    def whoami(self, user=None, password=None, authorization=None):
        import base64
        headers = {}
        if user is not None:
            authorization = 'Basic ' + base64.b64encode(
                ('%s:%s' % (user, password)).encode()).decode()
        if authorization is not None:
            headers['Authorization'] = authorization
        return self.http(self.port, 'GET', '/whoami', headers=headers)

    def test_hash_password_command(self):
        line = self.hash_line('alice', 's3cret')
        name, encoded = line.split()
        self.assertEqual(name, 'alice')
        self.assertRegex(encoded, r'^\$scrypt\$n=16384,r=8,p=1\$[^$]+\$[^$]+$')
        params = brim._parse_hash(encoded)
        self.assertTrue(brim._check_password(b's3cret', params))
        self.assertFalse(brim._check_password(b's3creT', params))
        self.assertNotEqual(self.hash_line('alice', 's3cret'), line)  # salt
        for args, stdin, message in (
                (['hash-password', 'al:ice'], b'pw\n', 'colon'),
                (['hash-password'], b'\n', 'empty'),
                (['start', 'extra'], b'', 'takes no argument')):
            code, out, err = run([sys.executable, BRIM] + args, env=self.env) \
                if not stdin else self.piped(args, stdin)
            self.assertEqual((code, out), (1, ''))
            self.assertIn(message, err)

    def piped(self, args, stdin):
        proc = popen([sys.executable, BRIM] + args, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(stdin, timeout=30)
        finally:
            _protected.discard(proc.pid)
        return proc.returncode, out.decode(), err.decode()

    def test_right_wrong_and_missing_credentials(self):
        import base64
        self.auth_server('# users\n\n' + self.hash_line('alice', 'pw \u00e9'))
        for kwargs in ({}, {'user': 'alice', 'password': 'wrong'},
                       {'user': 'bob', 'password': 'pw \u00e9'},
                       {'user': 'alice', 'password': 'pw \u00e9x'},
                       {'authorization': 'Basic !!!not-base64'},
                       {'authorization': 'Basic ' + base64.b64encode(
                           b'alice').decode()},
                       {'authorization': 'Bearer abc'}):
            status, headers, _body = self.whoami(**kwargs)
            self.assertEqual(status, 401, kwargs)
            self.assertEqual(headers['www-authenticate'],
                             'Basic realm="Test \\"Realm\\"", '
                             'charset="UTF-8"')
        for _ in range(2):      # the second is checked without scrypt
            status, _headers, body = self.whoami('alice', 'pw \u00e9')
            self.assertEqual((status, json.loads(body)), (200,
                                                          ['alice', False]))
        # A request's line is logged after its answer: wait for the last.
        self.wait_for_log(r' GET /whoami HTTP/1.1 ', count=9)
        lines = [f for f in self.request_lines() if f['path'] == '/whoami']
        self.assertEqual([f['status'] for f in lines], ['401'] * 7 +
                         ['200'] * 2)
        self.assertIn(' alice ', lines[-1]['line'])
        self.assertNotIn(' alice ', lines[1]['line'])
        # unauthed_paths (default /favicon.ico) need no credentials.
        self.assertEqual(self.http(self.port, 'GET', '/favicon.ico')[0], 404)

    def test_reloaded_auth_file(self):
        self.auth_server(self.hash_line('alice', 'old'))
        self.assertEqual(self.whoami('alice', 'old')[0], 200)
        alice, bob = self.hash_line('alice', 'new'), self.hash_line('bob',
                                                                    'bobs')
        self.write_users(alice + bob)
        wait_until(lambda: self.whoami('bob', 'bobs')[0] == 200,
                   timeout=15, msg='bob never got in')
        self.assertEqual(self.whoami('alice', 'old')[0], 401)
        self.assertEqual(self.whoami('alice', 'new')[0], 200)
        self.write_users(alice + 'carol this-is-not-a-hash\n' + bob +
                         'dave ' + bob.split()[1] + ' extra\n')
        # The file is looked at when requests come, at most every
        # check_interval: ask until the worker has read this one.  Its bad
        # lines are skipped, each logged once; the good one counts.
        broken = re.compile(r'ERROR .*\[auth\] auth_path .*users: line (\d) '
                            r'is not "name \$scrypt\$\.\.\." .*; skipping it$',
                            re.M)

        def skipped_the_bad_lines():
            self.assertEqual(self.whoami('bob', 'bobs')[0], 200)
            return broken.search(self.log_text())
        wait_until(skipped_the_bad_lines, timeout=15)
        self.assertEqual(broken.findall(self.log_text()), ['2', '4'])
        self.assertEqual(self.whoami('alice', 'new')[0], 200)
        self.assertEqual(self.whoami('dave', 'bobs')[0], 401)
        # A file that cannot be read leaves the users before in place.
        os.unlink(self.auth_path)
        gone = re.compile(r'ERROR .*\[auth\] auth_path .*users: .*No such '
                          r'file.*; keeping the 2 users read before')

        def refused_the_file():
            self.assertEqual(self.whoami('bob', 'bobs')[0], 200)
            return gone.search(self.log_text())
        wait_until(refused_the_file, timeout=15)
        self.assertEqual(len(gone.findall(self.log_text())), 1)
        self.assertEqual(self.whoami('bob', 'bobs')[0], 200)

    def test_auth_path_checked_at_start(self):
        self.port = free_port()
        bad = os.path.join(self.tmp, 'bad-users')
        with open(bad, 'w') as fp:
            fp.write('alice $scrypt$n=16384,r=8,p=1$bad$bad\n')
        for auth_path, message in (
                (None, '[auth] auth_path must name a file'),
                (os.path.join(self.tmp, 'nowhere'),
                 '[auth] auth_path %s cannot be read' %
                 os.path.join(self.tmp, 'nowhere')),
                (bad, '[auth] auth_path %s: line 1 is not' % bad)):
            self.write_conf(AUTH_CONF.replace(
                'auth_path = %(auth_path)s\n', 'auth_path = %s\n' % auth_path
                if auth_path else '') % {'port': self.port})
            code, out, err = self.brim('start')
            self.track(self.read_pid())
            self.assertEqual(code, 1, out)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(message, err)

    def test_users_file_lines(self):
        """Each bad line is skipped on its own; the last line of a name
        counts; blank lines and comments are no users."""
        good, other = brim._hash_password('pw'), brim._hash_password('pw2')
        lines = [
            b'# users', b'', b'alice ' + good.encode(),
            b'bob this-is-not-a-hash',
            b'carol ' + good.encode() + b' extra',         # three fields
            b'da:ve ' + good.encode(),                     # a colon
            b'\xffeve ' + good.encode(),                   # not UTF-8
            b'fred ' + good.encode()[:-2] + b'x',          # hash's padding
            b'alice ' + good.replace('n=16384', 'n=1000').encode(),
            b'bob ' + good.encode(), b'  \t', b'gina',
            b'alice ' + other.encode() + b'  ']
        path = os.path.join(self.tmp, 'users')
        with open(path, 'wb') as fp:
            fp.write(b'\n'.join(lines))
        users, problems = brim._read_users(path)
        self.assertEqual(sorted(users), ['alice', 'bob'])
        self.assertEqual(users['alice'], brim._parse_hash(other))
        self.assertEqual([int(p.split()[1]) for p in problems],
                         [4, 5, 6, 7, 8, 9, 12])
        for problem in problems:
            self.assertRegex(problem, r'^line \d+ is not "name \$scrypt\$'
                                      r'\.\.\." \(a name without a colon, '
                                      r'then a hash from: python3 brim\.py '
                                      r'hash-password NAME\)$')

    def test_bad_line_keeps_every_worker_on_the_same_users(self):
        """A worker that never read the file with bob in it still lets
        bob in once a bad line follows: it reads the good lines."""
        self.port = free_port()
        self.auth_path = os.path.join(self.tmp, 'users')
        alice, bob = self.hash_line('alice', 'pw'), self.hash_line('bob',
                                                                   'bobs')
        self.write_users(alice)
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = 2
            apps = auth misc

            [auth]
            call = brim.wsgi_basic_auth.WSGIBasicAuth
            auth_path = %s
            check_interval = 0.1

            [misc]
            call = myapps.Misc
            ''' % (self.port, self.auth_path))
        workers = set(live_children_of(self.start()))
        self.assertEqual(len(workers), 2)
        credentials = {'Authorization': 'Basic ' + base64.b64encode(
            b'bob:bobs').decode()}

        def bob_gets_pid():
            status, _headers, body = self.http(self.port, 'GET', '/pid',
                                               headers=credentials)
            return status == 200 and int(body)
        # Bob is added; the one worker that answers him reads that file.
        self.write_users(alice + bob)
        wait_until(bob_gets_pid, timeout=15, msg='bob got in')
        self.write_users(alice + bob + 'garbage\n')
        answered = set()

        def every_worker_let_bob_in():
            pid = bob_gets_pid()
            if pid:
                answered.add(pid)
            return answered == workers
        wait_until(every_worker_let_bob_in, timeout=20,
                   msg='every worker let bob in')
        for _ in range(20):
            self.assertIn(bob_gets_pid(), workers)
        self.assertEqual(self.http(self.port, 'GET', '/pid', headers={
            'Authorization': 'Basic ' + base64.b64encode(
                b'garbage:').decode()})[0], 401)
        self.wait_for_log(r'ERROR .*\[auth\] auth_path .*users: line 3 is '
                          r'not .*; skipping it$')

    def test_check_and_start_refuse_a_bad_line(self):
        self.port = free_port()
        self.auth_path = os.path.join(self.tmp, 'users')
        self.write_users(self.hash_line('alice', 'pw') + '\nbob nothing\n')
        self.write_conf(AUTH_CONF % {'port': self.port,
                                     'auth_path': self.auth_path})
        for command in ('check', 'start'):
            code, out, err = self.brim(command)
            self.track(self.read_pid())
            self.assertEqual((code, err.count('\n')), (1, 1), out)
            self.assertIn('[auth] auth_path %s: line 3 is not "name '
                          '$scrypt$..."' % self.auth_path, err)
        self.assertTrue(connect_refused(self.port))


class TestStatsPage(BrimTestCase):
    """WSGIStats's live page for browsers, and the JSON it polls."""

    def page_server(self):
        self.port, self.admin = free_port(), free_port()
        self.tcp_port, self.udp_port = free_port(), free_udp_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = echo

            [wsgi#admin]
            ip = 127.0.0.1
            port = %d
            workers = 2
            apps = stats

            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho

            [udp]
            ip = 127.0.0.1
            port = %d
            call = brim.udp_echo.UDPEcho

            [daemons]
            daemons = sample

            [sample]
            call = brim.daemon_sample.DaemonSample

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            refresh = 0.25
            ''' % (self.port, self.admin, self.tcp_port, self.udp_port))
        return self.start()

    def test_formats(self):
        self.page_server()
        browser = {'Accept': 'text/html,application/xhtml+xml,*/*;q=0.8'}
        for path, headers, kind in (
                ('/stats', {}, 'application/json'),
                ('/stats', {'Accept': '*/*'}, 'application/json'),
                ('/stats', browser, 'text/html; charset=utf-8'),
                ('/stats?format=html', {}, 'text/html; charset=utf-8'),
                ('/stats?format=json', browser, 'application/json')):
            status, got, _body = self.http(self.admin, 'GET', path,
                                           headers=headers)
            self.assertEqual((status, got['content-type']), (200, kind),
                             (path, headers))
            self.assertEqual(got['vary'], 'Accept')
        self.assertEqual(self.http(self.admin, 'GET', '/stats?format=xml')[0],
                         400)

    def test_page_is_self_contained(self):
        from html.parser import HTMLParser
        self.page_server()
        status, headers, body = self.http(self.admin, 'GET',
                                          '/stats?format=html')
        page = body.decode('utf-8')
        nonce = re.search(r"script-src 'nonce-([^']+)'",
                          headers['content-security-policy']).group(1)
        self.assertIn("default-src 'none'",
                      headers['content-security-policy'])

        class Page(HTMLParser):
            tags = []

            def handle_starttag(self, tag, attrs):
                self.tags.append((tag, dict(attrs)))
        parsed = Page()
        parsed.feed(page)
        for tag, attrs in parsed.tags:
            self.assertNotIn('src', attrs, tag)
            self.assertIn(attrs.get('href', '?format=json'),
                          ('?format=json',), tag)
            if tag in ('script', 'style'):
                self.assertEqual(attrs.get('nonce'), nonce)
        self.assertNotIn('<link', page)
        self.assertNotIn('url(', page)
        self.assertNotIn('@import', page)
        # The one URL in it is SVG's namespace name, which is not fetched.
        self.assertEqual(set(re.findall(r'https?://[^\'"\s]*', page)),
                         {'http://www.w3.org/2000/svg'})
        body_attrs = dict([a for t, a in parsed.tags if t == 'body'][0])
        self.assertEqual((body_attrs['data-source'],
                          body_attrs['data-refresh']), ('?format=json',
                                                        '0.25'))

    def test_json_the_page_polls(self):
        main_pid = self.page_server()
        stats = self.stats(self.admin, '/stats?format=json')
        workers = stats['workers']
        self.assertEqual([(w['subserver'], w['kind'], w['label'])
                          for w in workers], [
            ('wsgi', 'wsgi', '0'), ('wsgi#admin', 'wsgi', '0'),
            ('wsgi#admin', 'wsgi', '1'), ('tcp', 'tcp', '0'),
            ('udp', 'udp', '0'), ('daemons', 'daemons', 'sample')])
        self.assertEqual(sorted(w['pid'] for w in workers),
                         sorted(live_children_of(main_pid)))
        for worker in workers:
            self.assertEqual(worker['restarts'], 0)
            self.assertLess(worker['uptime'], 60)
        tcp = [w for w in workers if w['subserver'] == 'tcp'][0]
        os.kill(tcp['pid'], signal.SIGKILL)

        def replaced():
            now = [w for w in self.stats(self.admin)['workers']
                   if w['subserver'] == 'tcp'][0]
            return now if now['pid'] not in (0, tcp['pid']) else None
        now = wait_until(replaced, timeout=15)
        self.assertEqual(now['restarts'], 1)
        self.assertIn(now['pid'], live_children_of(main_pid))

    def test_page_renders_in_chromium(self):
        browser = shutil.which('chromium') or shutil.which('chromium-browser')
        if browser is None:
            self.skipTest('no chromium on this machine (apt-get install '
                          'chromium) to render the stats page')
        self.page_server()
        for _ in range(7):
            self.echo_ok(self.port)
        udp_exchange(self.udp_port, b'hi')
        pids = {w['subserver'] + '/' + w['label']: w['pid']
                for w in self.stats(self.admin)['workers']}
        code, dom, err = run([
            browser, '--headless', '--no-sandbox', '--disable-gpu',
            '--user-data-dir=' + os.path.join(self.tmp, 'chromium'),
            '--virtual-time-budget=3000', '--dump-dom',
            'http://127.0.0.1:%d/stats?format=html' % self.admin],
            timeout=90)
        self.assertEqual(code, 0, err[-2000:])
        self.assertRegex(dom, r'<span id="status" class="">updated ')
        cards = dict(re.findall(r'<section data-subserver="([^"]+)">(.*?)'
                                r'</section>', dom, re.S))
        self.assertEqual(sorted(cards), ['daemons', 'tcp', 'udp', 'wsgi',
                                         'wsgi#admin'])
        for key, pid in pids.items():
            self.assertIn('<td class="pid">%d</td>' % pid,
                          cards[key.split('/')[0]], key)
        # wsgi's one worker served the seven echoes, and nothing else.
        self.assertRegex(cards['wsgi'], r'<td>0</td><td class="pid">\d+'
                                        r'</td><td>\d+s</td><td>7</td>'
                                        r'<td>0</td>')
        self.assertIn('requests/s', cards['wsgi'])
        self.assertIn('1 of 1 workers running', cards['wsgi'])
        self.assertNotIn('workers running', cards['daemons'])
        self.assertIn('<b>2xx</b>7', cards['wsgi'])
        self.assertIn('<polyline', cards['wsgi'])
        self.assertIn('datagram_count', cards['udp'])
        self.assertIn('<td>sample</td>', cards['daemons'])
        # last_run (seconds since the epoch) reads as a time of day, not
        # as a ten-digit count
        self.assertRegex(cards['daemons'], r'<td>\d{1,2}:\d\d:\d\d')
        self.assertNotRegex(cards['daemons'], r'\d,\d{3},\d{3},\d{3}')
        self.assertIn('peak 0.00/s', cards['udp'])

    def test_refresh_checked_at_start(self):
        self.stats_only_conf(stats_extra='refresh = 0')
        code, out, err = self.brim('start')
        self.track(self.read_pid())
        self.assertEqual((code, err.count('\n')), (1, 1), out)
        self.assertIn('[stats] refresh must be above 0', err)


# ---------------------------------------------------------------------------
# 10 and 11. The brimd script and the shipped sample configuration
# ---------------------------------------------------------------------------

class TestModuleMap(unittest.TestCase):
    """The module docstring's map names brim.py's sections, in order."""

    def test_the_map_lists_every_banner_in_order(self):
        with open(BRIM, encoding='utf-8') as fp:
            source = fp.read()
        banners = [title.split(':')[0] for title in re.findall(
            r'^# -{20,}\n# (.+)\n# -{20,}$', source, re.M)]
        the_map = brim.__doc__.split('one banner a\nsection:')[1]
        entries = [line.strip().split('  ')[0] for line in
                   the_map.splitlines() if re.match(r'    \S', line)]
        self.assertGreater(len(banners), 10)
        self.assertEqual(entries, banners)

    def test_no_module_name_is_defined_twice(self):
        """One name, one meaning: a second def of a name silently
        replaces the first for every caller."""
        import ast
        with open(BRIM, encoding='utf-8') as fp:
            tree = ast.parse(fp.read())
        defined = collections.Counter()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name] += 1
            elif isinstance(node, ast.Assign):
                defined.update(target.id for target in node.targets
                               if isinstance(target, ast.Name))
        self.assertEqual([name for name, count in defined.items()
                          if count > 1], [])


class TestBrimdScript(EchoTestCase):
    """./brimd works in place and when copied with brim.py elsewhere."""

    def test_brimd_in_repo(self):
        self.echo_conf()
        code, out, err = self.brim('start', script=BRIMD, cwd=HERE)
        pid = self.read_pid()
        self.track(pid)
        self.assertEqual((code, err), (0, ''), out)
        self.assertTrue(pid_alive(pid))
        self.echo_ok(self.port)
        code, out, err = self.brim('status', script=BRIMD, cwd=HERE)
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % pid))
        code, out, err = self.brim('stop', script=BRIMD, cwd=HERE)
        self.assertEqual((code, err), (0, ''))
        self.assert_gone([pid])
        self.assertFalse(os.path.exists(self.pid_file))

    def test_brimd_copied_elsewhere(self):
        bindir = os.path.join(self.tmp, 'bin')
        os.mkdir(bindir)
        shutil.copy2(BRIMD, bindir)
        shutil.copy2(BRIM, bindir)
        script = os.path.join(bindir, 'brimd')
        self.echo_conf()
        env = dict(self.env, PYTHONPATH=self.tmp)   # not the repo
        code, out, err = self.brim('start', script=script, env=env,
                                   cwd=self.tmp)
        pid = self.read_pid()
        self.track(pid)
        self.assertEqual((code, err), (0, ''), out)
        self.echo_ok(self.port)
        self.assertIn(os.path.join(bindir, 'brimd'), proc_cmdline(pid))
        code, out, err = self.brim('stop', script=script, env=env,
                                   cwd=self.tmp)
        self.assertEqual((code, err), (0, ''), self.log_text()[-4000:])
        self.assert_gone([pid])


    def test_a_worker_started_from_the_script_is_as_small(self):
        """python3 brim.py's workers do not carry the script's syntax tree
        (about 10 MB, kept by CPython until a script ends): they hold what
        brimd's do, which import brim."""
        self.echo_conf()
        sizes = {}
        for script in (BRIM, BRIMD):
            pid = self.start(script=script)
            self.echo_ok(self.port)
            [worker] = live_children_of(pid)
            sizes[script] = proc_status(worker)['VmRSS']
            self.stop(script=script)
            self.assert_gone([pid])
        script_kb, brimd_kb = (int(sizes[s].split()[0]) for s in
                               (BRIM, BRIMD))
        self.assertLess(script_kb, brimd_kb + 3000, sizes)
        self.assertIn(BRIM, proc_cmdline(self.start(script=BRIM)))


class TestSampleConf(BrimTestCase):
    """The shipped brimd.conf-sample starts and serves echo and stats."""

    def test_sample_conf(self):
        with open(SAMPLE) as fp:
            text = fp.read()
        self.assertIn('\nport = 8901\n', text)
        port = free_port()
        text = text.replace('\nport = 8901\n', '\nport = %d\n' % port)
        path = os.path.join(self.tmp, 'brimd.conf-sample')
        with open(path, 'w') as fp:
            fp.write(text)
        home = os.path.join(self.tmp, 'home')
        os.mkdir(home)
        env = dict(self.env, HOME=home)
        code, out, err = self.brim('start', conf=path, env=env)
        pid = self.read_pid()
        self.track(pid)
        self.assertEqual((code, err), (0, ''), out)
        self.echo_ok(port)
        stats = self.stats(port)
        self.assertEqual(stats['wsgi']['echo.requests'], 1)
        code, out, err = self.brim('stop', conf=path, env=env)
        self.assertEqual((code, err), (0, ''))
        self.assert_gone([pid])
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertFalse(os.path.exists(os.path.join(home,
                                                     '.brimd-sample.pid')))


# ---------------------------------------------------------------------------
# 12. Operations: check, foreground, systemd, hung workers, log handling
# ---------------------------------------------------------------------------

APP_SOURCES['myops.py'] = '''
import os
import time


class Orphan(object):
    """/orphan: leaves a grandchild behind, as a careless app would."""

    def __init__(self, name, conf, next_app):
        self.next_app = next_app

    def __call__(self, env, start_response):
        if env['PATH_INFO'] != '/orphan':
            return self.next_app(env, start_response)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.5)
                os._exit(0)
            os.write(write_end, str(grandchild).encode())
            os._exit(0)
        os.waitpid(child, 0)
        body = os.read(read_end, 32)
        os.close(read_end)
        os.close(write_end)
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]
'''


class NotifyListener(object):
    """A stand-in for systemd's NOTIFY_SOCKET: collects the datagrams."""

    def __init__(self):
        self.name = '@brim-test-notify-%d-%s' % (os.getpid(),
                                                 os.urandom(4).hex())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind('\0' + self.name[1:])
        self.sock.settimeout(0.05)
        self.messages = []

    def poll(self):
        """Every message so far, each as a dict of its assignments."""
        while True:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return self.messages
            self.messages.append(dict(line.split('=', 1) for line in
                                      data.decode().splitlines()))

    def wait_for(self, key, value=None, after=0, timeout=10):
        """The index of the first message from ``after`` on with ``key``."""
        def found():
            for index, message in enumerate(self.poll()):
                if index >= after and key in message and \
                        (value is None or message[key] == value):
                    return index + 1
        return wait_until(found, timeout=timeout, msg='%s=%s' % (key, value)) \
            - 1

    def close(self):
        self.sock.close()


class TestOperations(EchoTestCase):
    """check, foreground, systemd notify and socket activation, hung
    workers, request_timeout, JSON logs and log reopening."""

    def wait_serving(self, proc):
        wait_until(lambda: proc.poll() is not None or
                   self.read_pid() == proc.pid, timeout=15)
        self.assertIsNone(proc.poll(), 'foreground exited: %s' % self.log_text(
            os.path.join(self.tmp, 'attached.out'))[-2000:])
        self.seen_pids.update(descendants_of(proc.pid))

    def in_background(self, fn, *args):
        """Run ``fn(*args)`` in a thread; a dict gets 'result' or 'error'."""
        box = {}

        def call():
            try:
                box['result'] = fn(*args)
            except Exception as err:
                box['error'] = err
        thread = threading.Thread(target=call)
        thread.start()
        self.addCleanup(thread.join, 30)
        box['thread'] = thread
        return box

    def generation(self):
        match = re.search(r'restarted in place (\d+) times',
                          self.brim('status')[1])
        return int(match.group(1)) if match else None

    # -- check ------------------------------------------------------------

    def test_check_passes_without_serving(self):
        self.echo_conf(workers=2)
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        # [brim]'s settings, the subserver's line and its settings.
        lines = out.splitlines()
        self.assertEqual(lines[0], '[brim]')
        self.assertEqual([line for line in lines if line[0] != ' '], [
            '[brim]', '[wsgi] wsgi on 127.0.0.1:%d (free to bind), 2 '
            'workers (at most 8)' % self.port, 'configuration OK'])
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertTrue(connect_refused(self.port))
        # With brimd running, its own port counts as fine; it keeps serving.
        pid = self.start()
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        self.assertIn('(held by the running brimd)', out)
        self.assertEqual(self.read_pid(), pid)
        self.echo_ok(self.port)

    def test_check_failures_match_start(self):
        self.echo_conf()
        with open(self.conf_path) as fp:
            good = fp.read()
        bad = good.replace('call = mywsgi.HelloWorld', 'call = mywsgi.Nope')
        with open(self.conf_path, 'w') as fp:
            fp.write(bad)
        check = self.brim('check')
        start = self.brim('start')
        self.assertEqual(check[0], 1)
        self.assertEqual(check[2], start[2])
        self.assertEqual(len(check[2].splitlines()), 1, check[2])
        self.assertIn('[hello] call = mywsgi.Nope', check[2])
        # A port something else holds.
        with open(self.conf_path, 'w') as fp:
            fp.write(good)
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(('127.0.0.1', self.port))
        holder.listen(1)
        code, out, err = self.brim('check')
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith('[wsgi] could not bind 127.0.0.1:%d'
                                       % self.port), err)
        # A certificate that is not there.
        holder.close()
        self.echo_conf(wsgi_extra='certfile = %s' % os.path.join(
            self.tmp, 'missing.pem'))
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (1, '[wsgi] certfile %s cannot be read: '
                         'No such file or directory.\n'
                         % os.path.join(self.tmp, 'missing.pem')))

    # -- foreground -------------------------------------------------------

    def test_foreground_sigterm_drains(self):
        self.echo_conf(workers=2)
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        workers = live_children_of(proc.pid)
        self.assertEqual(len(workers), 2)
        slow = self.in_background(self.http, self.port, 'GET', '/slow?2')
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: connect_refused(self.port), msg='port released')
        self.assertTrue(slow['thread'].is_alive())
        slow['thread'].join(20)
        self.assertNotIn('error', slow)
        self.assertEqual(slow['result'][0], 200)
        self.assertTrue(slow['result'][2].endswith(b':done'))
        self.assertEqual(proc.wait(20), 0)
        self.assert_gone(workers)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_foreground_sigint_stops_at_once(self):
        self.echo_conf()
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        workers = live_children_of(proc.pid)
        slow = self.in_background(self.http, self.port, 'GET', '/slow?20')
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        self.assertEqual(proc.wait(10), 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assert_gone(workers)
        slow['thread'].join(10)
        self.assertIn('error', slow)

    def test_stop_command_on_foreground_is_immediate(self):
        self.echo_conf()
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        slow = self.in_background(self.http, self.port, 'GET', '/slow?20')
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        started = time.monotonic()
        self.stop()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(proc.wait(5), 0)
        slow['thread'].join(10)
        self.assertIn('error', slow)

    def test_foreground_restart_in_place(self):
        self.echo_conf(workers=2)
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        stop = threading.Event()
        self.addCleanup(stop.set)
        results = []

        def hammer():
            while not stop.is_set() and len(results) < 20000:
                try:
                    results.append(self.http(self.port, 'POST', '/echo',
                                             b'in place'))
                except Exception as err:
                    results.append(('error', repr(err)))
        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for client in clients:
            client.start()
        wait_until(lambda: len(results) > 10)
        for signalled, generation in ((True, 1), (False, 2)):
            old_workers = live_children_of(proc.pid)
            if signalled:
                os.kill(proc.pid, signal.SIGUSR2)
                wait_until(lambda: self.generation() == generation,
                           timeout=20)
            else:
                code, out, err = self.brim('restart')
                self.assertEqual((code, err), (0, ''), out)
                self.assertEqual(self.generation(), generation)
            self.assert_gone(old_workers, timeout=15)
            self.assertEqual(self.read_pid(), proc.pid)
            self.assertIsNone(proc.poll())
        count = len(results)
        wait_until(lambda: len(results) > count + 10)
        # A broken configuration: refused, the running brimd untouched.
        with open(self.conf_path) as fp:
            good = fp.read()
        with open(self.conf_path, 'w') as fp:
            fp.write(good.replace('workers = 2', 'workers = two'))
        code, out, err = self.brim('restart')
        self.assertEqual((code, err), (1, "Configuration value [wsgi] "
                         "workers of 'two' cannot be converted to int.\n"))
        self.assertEqual(self.generation(), 2)
        os.kill(proc.pid, signal.SIGUSR2)
        self.wait_for_log(r'restart in place refused: Configuration value '
                          r'\[wsgi\] workers')
        self.echo_ok(self.port)
        stop.set()
        for client in clients:
            client.join(15)
        errors = [r for r in results if r[0] != 200 or r[2] != b'in place']
        self.assertEqual(errors, [], '%d requests' % len(results))

    def test_daemon_restarts_in_place_on_sigusr2(self):
        self.echo_conf(workers=2)
        pid = self.start()
        old_workers = live_children_of(pid)
        os.kill(pid, signal.SIGUSR2)
        wait_until(lambda: self.generation() == 1, timeout=20)
        self.assert_gone(old_workers, timeout=15)
        self.assertEqual(self.read_pid(), pid)
        self.assertEqual(len(live_children_of(pid)), 2)
        self.echo_ok(self.port)
        self.stop()
        self.assert_gone([pid])

    def test_foreground_reaps_orphans(self):
        self.echo_conf(wsgi_extra='')
        with open(self.conf_path) as fp:
            text = fp.read()
        with open(self.conf_path, 'w') as fp:
            fp.write(text.replace('apps = misc', 'apps = orphan misc') +
                     '\n[orphan]\ncall = myops.Orphan\n')
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        status, _h, body = self.http(self.port, 'GET', '/orphan')
        self.assertEqual(status, 200)
        orphan = int(body)
        # The orphan is adopted by brimd (not by this test process) ...
        wait_until(lambda: proc_stat(orphan) is None or
                   proc_stat(orphan)[1] == proc.pid, timeout=5)
        # ... and reaped by it once it exits: never left a zombie.
        wait_until(lambda: proc_stat(orphan) is None, timeout=10,
                   msg='orphan %d reaped' % orphan)

    # -- systemd ----------------------------------------------------------

    def test_notify_protocol(self):
        self.echo_conf()
        listener = NotifyListener()
        self.addCleanup(listener.close)
        env = dict(self.env, NOTIFY_SOCKET=listener.name,
                   WATCHDOG_USEC='400000')
        proc = self.run_attached('foreground', env=env)
        ready = listener.wait_for('READY', '1')
        self.assertEqual(listener.messages[ready]['MAINPID'], str(proc.pid))
        self.assertIn('serving [wsgi] 127.0.0.1:%d' % self.port,
                      listener.messages[ready]['STATUS'])
        first = listener.wait_for('WATCHDOG', '1', after=ready)
        listener.wait_for('WATCHDOG', '1', after=first + 1)
        os.kill(proc.pid, signal.SIGUSR2)
        reloading = listener.wait_for('RELOADING', '1', after=ready + 1)
        self.assertTrue(listener.messages[reloading]['MONOTONIC_USEC']
                        .isdigit())
        listener.wait_for('READY', '1', after=reloading + 1, timeout=20)
        os.kill(proc.pid, signal.SIGTERM)
        listener.wait_for('STOPPING', '1')
        self.assertEqual(proc.wait(15), 0)

    def test_unreachable_notify_socket_is_logged_once(self):
        self.echo_conf()
        env = dict(self.env, NOTIFY_SOCKET=os.path.join(self.tmp, 'nothing'),
                   WATCHDOG_USEC='400000')
        proc = self.run_attached('foreground', env=env)
        self.wait_serving(proc)
        self.echo_ok(self.port)
        self.wait_for_log('NOTIFY_SOCKET .* cannot be reached')
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)
        self.assertEqual(len(re.findall('NOTIFY_SOCKET', self.log_text())), 1)

    @unittest.skipUnless(shutil.which('systemd-socket-activate'),
                         'needs systemd-socket-activate')
    def test_socket_activation(self):
        self.echo_conf(wsgi_extra='listen_retry = 0')
        spare = free_port()
        prefix = ['systemd-socket-activate', '-l', '127.0.0.1:%d' % self.port,
                  '-l', '127.0.0.1:%d' % spare, '-E', 'PYTHONPATH']
        proc = self.run_attached('foreground', prefix=prefix)
        # systemd-socket-activate starts brimd on the first connection.
        wait_until(lambda: not connect_refused(self.port), timeout=10)
        self.echo_ok(self.port)
        self.wait_serving(proc)
        self.wait_for_log(r'inherited listening socket tcp 127.0.0.1 %d '
                          r'matches no subserver' % spare)
        self.assertTrue(connect_refused(spare))
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)

    # -- hung workers and stuck requests ----------------------------------

    def test_stopped_worker_is_replaced(self):
        self.echo_conf(wsgi_extra='worker_timeout = 2')
        pid = self.start()
        status, _h, txn = self.http(self.port, 'GET', '/txn')
        self.assertEqual(status, 200)
        worker, = live_children_of(pid)
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: live_children_of(pid) not in ([], [worker]),
                   timeout=8)
        self.assertLess(time.monotonic() - stopped, 2 + 2)
        self.assert_gone([worker])
        line = self.wait_for_log(r'is hung')[0]
        self.assertIn('[wsgi] worker 0 (pid %d) is hung' % worker, line)
        self.assertIn('%s GET /txn' % txn.decode(), line)
        self.echo_ok(self.port)

    def test_request_timeout_recycles_worker(self):
        self.echo_conf(wsgi_extra='request_timeout = 1')
        pid = self.start()
        worker, = live_children_of(pid)
        slow = self.in_background(self.http, self.port, 'GET', '/slow?3')
        line = self.wait_for_log(r'over request_timeout \(1s\)')[0]
        self.assertRegex(line, r'request \w+ GET /slow has run for \d+s')
        # A replacement serves while the stuck request finishes.
        wait_until(lambda: self.http(self.port, 'GET', '/pid')[2] !=
                   str(worker).encode(), timeout=5)
        self.assertTrue(slow['thread'].is_alive())
        slow['thread'].join(20)
        self.assertEqual(slow['result'][0], 200)
        self.assert_gone([worker])

    # -- logs -------------------------------------------------------------

    def test_log_format_json(self):
        self.echo_conf(wsgi_extra='log_format = json')
        self.start()
        self.http(self.port, 'POST', '/echo?x=1', b'abc',
                  headers={'User-Agent': 'a "quoted"\tagent'})

        def request_line():
            for line in self.log_lines():
                if '"method": "POST"' in line:
                    return json.loads(line)
        record = wait_until(request_line)
        self.assertEqual(
            {k: record[k] for k in ('client', 'method', 'path', 'query',
                                    'protocol', 'status', 'bytes',
                                    'user_agent', 'referer', 'log_info')},
            {'client': '127.0.0.1', 'method': 'POST', 'path': '/echo',
             'query': 'x=1', 'protocol': 'HTTP/1.1', 'status': 200,
             'bytes': 3, 'user_agent': 'a "quoted"\tagent', 'referer': None,
             'log_info': []})
        self.assertRegex(record['txn'], r'^[0-9a-f]+$')
        self.assertIsInstance(record['duration_ms'], float)
        self.assertRegex(record['time'], r'^\d{4}-\d\d-\d\dT[\d:.]+Z$')

    def test_bad_log_format(self):
        self.echo_conf(wsgi_extra='log_format = xml')
        self.assertEqual(self.brim('start')[1:], (
            '', "[wsgi] log_format 'xml' is not text or json.\n"))

    def test_sigusr1_reopens_log_files(self):
        self.echo_conf()
        pid = self.start()
        self.echo_ok(self.port)
        os.rename(self.log_file, self.log_file + '.1')
        os.kill(pid, signal.SIGUSR1)
        self.wait_for_log('reopened the log files')
        # The worker reopens within a second; until then it writes to .1.
        wait_until(lambda: self.http(self.port, 'GET', '/txn')[2].decode()
                   in self.log_text(), timeout=5)


# ---------------------------------------------------------------------------
# 12. Plain WSGI apps (call = module:app, serve, brim.serve), and what a
#     first run meets: a busy port, paths it cannot write, imports
# ---------------------------------------------------------------------------

# Stand-ins for a framework's app, standard library only: a package with
# a plain WSGI callable ``application`` (as Django's mysite/wsgi.py), and
# a module with ``app`` and a ``create_app()`` factory (as Flask's).
PLAIN_APP_SOURCES = {
    'mysite/__init__.py': '',
    'mysite/wsgi.py': '''
import os


def application(environ, start_response):
    body = ('mysite %d %s' % (os.getpid(), environ['PATH_INFO'])).encode()
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', str(len(body)))])
    return [body]
''',
    'flaskish.py': '''
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Flaskish(object):
    """/slow?S sleeps S seconds (noting its start in slow-started)."""

    def __call__(self, environ, start_response):
        if environ['PATH_INFO'] == '/slow':
            open(os.path.join(HERE, 'slow-started'), 'w').close()
            time.sleep(float(environ['QUERY_STRING']))
        body = ('flaskish %d' % os.getpid()).encode()
        start_response('200 OK', [('Content-Length', str(len(body)))])
        return [body]


app = Flaskish()
not_an_app = 'a str'


def create_app():
    with open(os.path.join(HERE, 'factory-calls'), 'a') as fp:
        fp.write('%d\\n' % os.getpid())
    return Flaskish()


def create_broken():
    raise RuntimeError('factory-marker')
''',
}

# An app whose answer the reload tests rewrite.
RELOAD_APP = '''
def application(env, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'%s']
'''


class TestReload(BrimTestCase):
    """--reload: foreground and no-daemon restart when an app's source, a
    configuration file or a reload_extra_files file changes; a broken
    change is shown with its traceback while the old code serves on."""

    def setUp(self):
        BrimTestCase.setUp(self)
        self.app_path = os.path.join(self.tmp, 'reloadme.py')
        self.template = os.path.join(self.tmp, 'page.html')
        self.rewrite(self.app_path, RELOAD_APP % 'v1')
        self.rewrite(self.template, 'one')
        self.port = free_port()
        self.write_conf('''
            [brim]
            reload_extra_files = %s

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = app

            [app]
            call = reloadme:application
            ''' % (os.path.join(self.tmp, '*.html'), self.port))

    def rewrite(self, path, text):
        """Write ``path`` and move its mtime on by a few seconds: a rewrite
        within the same second, of the same size, must still look new
        (to the reloader and to Python's cached bytecode)."""
        before = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
        with open(path, 'w') as fp:
            fp.write(text)
        later = max(before + 3 * 10 ** 9, time.time_ns())
        os.utime(path, ns=(later, later))

    def answers(self, expected, proc):
        """Wait until a request answers ``expected``, from the same main
        process."""
        def answer():
            self.assertIsNone(proc.poll(), 'brimd exited: %s' % self.log_text(
                os.path.join(self.tmp, 'attached.out'))[-2000:])
            return self.http(self.port, timeout=5)[2] == expected
        wait_until(answer, timeout=20, msg='answering %r' % expected)
        self.seen_pids.update(descendants_of(proc.pid))

    def test_foreground_reloads_and_serves_on_through_a_broken_change(self):
        proc = self.run_attached('foreground', '--reload')
        self.answers(b'v1', proc)
        self.wait_for_log(r'--reload: watching \d+ files for changes')
        self.rewrite(self.app_path, RELOAD_APP % 'v2')
        self.answers(b'v2', proc)
        self.assertEqual(self.read_pid(), proc.pid)
        self.wait_for_log(r'reloading: %s changed' % re.escape(self.app_path))
        self.rewrite(self.app_path, RELOAD_APP % 'v2' + 'def (\n')
        self.wait_for_log('reload refused')
        log = self.log_text()
        self.assertIn('File "%s", line 5' % self.app_path, log)
        self.assertIn('SyntaxError', log)
        self.assertNotIn('_import_name', log, 'brim\'s own frames shown')
        self.assertEqual(self.http(self.port)[2], b'v2')
        self.rewrite(self.app_path, RELOAD_APP % 'v3')
        self.answers(b'v3', proc)
        self.assertEqual(self.log_text().count('reload refused'), 1)
        self.assertEqual(self.read_pid(), proc.pid)

    def test_extra_files_and_the_conf_file_reload_too(self):
        proc = self.run_attached('foreground', '--reload')
        self.answers(b'v1', proc)
        self.rewrite(self.template, 'two')
        self.wait_for_log(r'reloading: %s changed'
                          % re.escape(self.template))
        self.wait_for_log(r'serving \[wsgi\]', count=2, timeout=20)
        with open(self.conf_path) as fp:
            conf = fp.read()
        self.rewrite(self.conf_path, conf + '# edited\n')
        self.wait_for_log(r'reloading: %s changed'
                          % re.escape(self.conf_path))
        self.wait_for_log(r'serving \[wsgi\]', count=3, timeout=20)
        self.answers(b'v1', proc)

    def test_no_daemon_reloads_in_its_one_process(self):
        proc = self.run_attached('no-daemon', '--reload')
        self.answers(b'v1', proc)
        self.rewrite(self.app_path, RELOAD_APP % 'v2')
        self.answers(b'v2', proc)
        self.wait_for_log(r'reloading: %s changed' % re.escape(self.app_path))

    def test_workers_that_fail_to_start_leave_the_old_ones_serving(self):
        with open(self.conf_path) as fp:
            conf = fp.read()
        self.rewrite(self.conf_path, conf.replace(
            'reloadme:application', 'reloadme:make()'))
        factory = RELOAD_APP + 'def make():\n    %s\n    return application\n'
        self.rewrite(self.app_path, factory % ('v1', ''))
        proc = self.run_attached('foreground', '--reload')
        self.answers(b'v1', proc)
        self.rewrite(self.app_path, factory % ('v2', 'raise OSError(5)'))
        self.wait_for_log('reload failed, the previous workers go on serving')
        self.assertIn('OSError: 5', self.log_text())
        self.assertEqual(self.http(self.port)[2], b'v1')
        self.rewrite(self.app_path, factory % ('v3', ''))
        self.answers(b'v3', proc)

    def test_only_attached_commands_take_reload(self):
        code, out, err = self.brim('start', '--reload')
        self.assertEqual((code, out), (1, ''))
        self.assertEqual(err, '--reload is for development, with foreground, '
                         'serve or no-daemon; start does not take it.\n')
        self.assertFalse(os.path.exists(self.pid_file))

    # -- in process -----------------------------------------------------------

    def test_each_change_is_told_once(self):
        gone = os.path.join(self.tmp, 'appears.txt')
        reloader = brim._Reloader([self.app_path, self.template, gone])

        def look():
            reloader.next_look = 0.0        # no waiting for the next second
            return reloader.changed()
        self.assertIsNone(look())
        self.rewrite(self.template, 'two')
        self.rewrite(self.app_path, RELOAD_APP % 'v2')
        self.assertIn(look(), (self.app_path, self.template))
        self.assertIsNone(look(), 'one change told twice')
        self.assertIsNone(reloader.changed(), 'looked twice within a second')
        os.replace(self.template, self.template + '.old')
        self.assertEqual(look(), self.template)     # gone
        self.rewrite(gone, 'here')
        self.assertEqual(look(), gone)              # appeared
        self.assertIsNone(look())

    def test_watched_files_are_the_projects_not_the_libraries(self):
        sys.path.insert(0, self.tmp)
        self.addCleanup(sys.path.remove, self.tmp)
        importlib.invalidate_caches()
        importlib.import_module('reloadme')     # as an app's call is
        self.addCleanup(sys.modules.pop, 'reloadme', None)
        conf = brim.read_conf([self.conf_path], explicit=True)
        missing = os.path.join(self.tmp, 'later.txt')
        watched = brim._watched_files(conf, (os.path.join(self.tmp, '*.html'),
                                             missing))
        for path in (self.app_path, self.conf_path, self.template, missing,
                     os.path.abspath(brim.__file__)):
            self.assertIn(path, watched)
        for module in (os, json, unittest):
            self.assertNotIn(os.path.abspath(module.__file__), watched)

    def test_a_reload_runs_the_same_command_and_checks_without_reload(self):
        _parser, args = brim._parse_args(['-c', 'a.conf', 'foreground',
                                          '--reload'])
        command_line = brim._CommandLine('/srv/brim.py', args)
        self.assertEqual(command_line.argv()[2:],
                         ['-c', 'a.conf', '--reload', 'foreground'])
        self.assertEqual(command_line.argv('check')[2:],
                         ['-c', 'a.conf', 'check'])


# A project that vendors brim.py and serves its app from Python.
SERVE_SCRIPT = '''
import os
import sys

import brim


def application(environ, start_response):
    body = ('script %d %d' % (os.getpid(), len(environ['wsgi.input'].read()))
            ).encode()
    start_response('200 OK', [('Content-Length', str(len(body)))])
    return [body]


sys.exit(brim.serve(application, port=int(sys.argv[1]), max_body=8,
                    log_format='json'))
'''


HEALTH_CONF = '''
[brim]
%(brim_extra)s
[wsgi]
ip = 127.0.0.1
port = %(port)d
workers = 2
apps = health misc echo
%(wsgi_extra)s
[health]
call = brim.wsgi_health.WSGIHealth
%(health_extra)s
[misc]
call = myapps.Misc
dir = %(dir)s

[echo]
call = brim.wsgi_echo.WSGIEcho
'''


class TestHealthAndRollingUpdates(EchoTestCase):
    """WSGIHealth's probes, shutdown_delay and reuse_port: a brimd that
    leaves a load balancer's rotation, or shares its port, without a
    failed request."""

    wait_serving = TestOperations.wait_serving
    in_background = TestOperations.in_background

    def health_conf(self, brim_extra='', wsgi_extra='', health_extra='',
                    port=None, name='brimd.conf'):
        self.port = port or free_port()
        return self.write_conf(HEALTH_CONF % {
            'port': self.port, 'dir': self.tmp, 'brim_extra': brim_extra,
            'wsgi_extra': wsgi_extra, 'health_extra': health_extra},
            name=name)

    def test_probes_answer_and_other_paths_pass_on(self):
        self.health_conf()
        self.start()
        for path, body in (('/readyz', b'ready\n'), ('/livez', b'live\n')):
            status, headers, got = self.http(self.port, 'GET', path)
            self.assertEqual((status, got), (200, body))
            self.assertEqual(headers['content-type'], 'text/plain')
            self.assertEqual(headers['cache-control'], 'no-store')
        self.echo_ok(self.port)
        # Probes log no request line; the echo does.
        self.wait_for_log(r' POST /echo HTTP/1.1 200 ')
        self.assertNotIn('/readyz', self.log_text())
        self.assertNotIn('/livez', self.log_text())

    def test_log_probes_logs_them(self):
        self.health_conf(health_extra='log_probes = yes\n')
        self.start()
        self.assertEqual(self.http(self.port, 'GET', '/readyz')[0], 200)
        self.wait_for_log(r' GET /readyz HTTP/1.1 200 ')

    def test_paths_are_options(self):
        self.health_conf(health_extra='ready_path = /r\nlive_path = /l\n')
        self.start()
        self.assertEqual(self.http(self.port, 'GET', '/r')[2], b'ready\n')
        self.assertEqual(self.http(self.port, 'GET', '/l')[2], b'live\n')
        self.assertEqual(self.http(self.port, 'GET', '/readyz')[0], 404)

    def test_sigterm_with_shutdown_delay_drops_nothing(self):
        self.health_conf(brim_extra='shutdown_delay = 2\n')
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        workers = live_children_of(proc.pid)
        outcome = {'ok': 0, 'failed': []}
        done = threading.Event()

        def load():
            while not done.is_set():
                try:
                    status, _h, body = self.http(self.port, 'POST', '/echo',
                                                 b'x')
                    if (status, body) == (200, b'x'):
                        outcome['ok'] += 1
                    else:
                        outcome['failed'].append(status)
                except OSError as err:
                    outcome['failed'].append(err)
        client = threading.Thread(target=load)
        client.start()
        self.addCleanup(client.join, 30)
        self.addCleanup(done.set)
        wait_until(lambda: outcome['ok'] >= 10, msg='load flows')
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: self.http(self.port, 'GET', '/readyz')[::2] ==
                   (503, b'draining\n'), msg='readiness fails')
        self.assertLess(time.monotonic() - sent, 0.5)
        # Alive, and still serving, through the delay.
        self.assertEqual(self.http(self.port, 'GET', '/livez')[0], 200)
        served_before = outcome['ok']
        wait_until(lambda: time.monotonic() - sent >= 1.5, msg='1.5s on')
        done.set()
        client.join(10)
        self.assertEqual(outcome['failed'], [])
        self.assertGreater(outcome['ok'], served_before)
        # Then the ports close (not before the delay) and brimd drains.
        wait_until(lambda: connect_refused(self.port), msg='port released')
        self.assertGreaterEqual(time.monotonic() - sent, 2.0)
        self.assertEqual(proc.wait(20), 0)
        self.assert_gone(workers)

    def test_shutdown_delay_without_the_app_and_a_second_sigterm(self):
        self.echo_conf(brim_extra='shutdown_delay = 30')
        proc = self.run_attached('foreground')
        self.wait_serving(proc)
        os.kill(proc.pid, signal.SIGTERM)
        self.wait_for_log(r'brimd not ready; shutting down gracefully in '
                          r'30s \(shutdown_delay\)')
        self.echo_ok(self.port)
        # A second SIGTERM ends the delay: brimd drains and exits now.
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(20), 0)
        self.assertLess(time.monotonic() - sent, 10)
        self.assertTrue(connect_refused(self.port))

    def test_shutdown_command_waits_out_the_delay(self):
        self.health_conf(brim_extra='shutdown_delay = 1.5\n')
        pid = self.start()
        sent = time.monotonic()
        command = self.in_background(self.brim, 'shutdown')
        wait_until(lambda: self.http(self.port, 'GET', '/readyz')[0] == 503,
                   msg='readiness fails')
        self.echo_ok(self.port)
        command['thread'].join(30)
        self.assertEqual(command['result'], (0, '', ''))
        self.assertGreaterEqual(time.monotonic() - sent, 1.5)
        self.assertFalse(pid_alive(pid))
        self.assertTrue(connect_refused(self.port))

    def probe(self, path, draining=False, ready=True, orphaned=False,
              beat_age=0.0):
        """WSGIHealth called in this process: (status, headers, body,
        whether the request is to be logged)."""
        layout = types.SimpleNamespace(ready=lambda: ready)
        subserver = types.SimpleNamespace(
            draining=draining, orphaned=lambda: orphaned,
            server=types.SimpleNamespace(stats_layout=layout))
        bucket = types.SimpleNamespace(
            heartbeat=lambda: time.time() - beat_age)
        env = {'PATH_INFO': path, 'brim': subserver, 'brim.stats': bucket}
        app = brim.WSGIHealth('health', ('/readyz', '/livez', False),
                              lambda env, start: [b'next'])
        got = {}
        body = b''.join(app(env, lambda status, headers: got.update(
            status=status, headers=dict(headers))))
        return (got.get('status'), got.get('headers'), body,
                env.get('brim.log_request', True))

    def test_probe_answers_in_process(self):
        self.assertEqual(self.probe('/readyz')[::2], ('200 OK', b'ready\n'))
        for state in ({'draining': True}, {'ready': False}):
            self.assertEqual(self.probe('/readyz', **state)[::2],
                             ('503 Service Unavailable', b'draining\n'))
        self.assertEqual(self.probe('/livez')[::2], ('200 OK', b'live\n'))
        for state in ({'orphaned': True}, {'beat_age': 10.0}):
            self.assertEqual(self.probe('/livez', **state)[::2],
                             ('503 Service Unavailable', b'unsupervised\n'))
        status, headers, body, logged = self.probe('/readyz', ready=False)
        self.assertEqual(headers, {'Content-Type': 'text/plain',
                                   'Content-Length': '9',
                                   'Cache-Control': 'no-store'})
        self.assertFalse(logged)
        self.assertEqual(self.probe('/other'), (None, None, b'next', True))

    def test_probe_paths_are_checked(self):
        self.health_conf(health_extra='ready_path = readyz\n')
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (1, "[health] ready_path must start "
                                          "with /, not 'readyz'.\n"))

    def test_shutdown_delay_is_checked(self):
        self.echo_conf(brim_extra='shutdown_delay = -1')
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (1, '[brim] shutdown_delay must be 0 '
                                          "or more seconds, not '-1'.\n"))

    def worker_pids_answering(self, port):
        return int(self.http(port, 'GET', '/pid')[2])

    def test_reuse_port_shares_a_port_between_two_brimd(self):
        blue = self.health_conf(wsgi_extra='reuse_port = yes\n',
                                name='blue.conf')
        green = self.health_conf(wsgi_extra='reuse_port = yes\n',
                                 port=self.port, name='green.conf')
        blue_pid_file = os.path.join(self.tmp, 'blue.pid')
        green_pid_file = os.path.join(self.tmp, 'green.pid')
        blue_pid = self.start(conf=blue, pid_file=blue_pid_file)
        code, out, err = self.brim('check', conf=green,
                                   pid_file=green_pid_file)
        self.assertEqual((code, err), (0, ''), out)
        self.assertIn('(in use, shared by reuse_port)', out)
        green_pid = self.start(conf=green, pid_file=green_pid_file)
        self.assertNotEqual(blue_pid, green_pid)
        blue_workers = set(live_children_of(blue_pid))
        green_workers = set(live_children_of(green_pid))
        seen = set()

        def both_answer():
            seen.add(self.worker_pids_answering(self.port))
            return seen & blue_workers and seen & green_workers
        wait_until(both_answer, timeout=20, msg='both brimd answer')
        code, out, err = self.brim('stop', conf=blue,
                                   pid_file=blue_pid_file)
        self.assertEqual(code, 0, (out, err))
        for _ in range(20):
            self.assertIn(self.worker_pids_answering(self.port),
                          green_workers)

    def test_without_reuse_port_a_second_brimd_is_refused(self):
        blue = self.health_conf(name='blue.conf')
        blue_pid_file = os.path.join(self.tmp, 'blue.pid')
        self.start(conf=blue, pid_file=blue_pid_file)
        self.health_conf(wsgi_extra='listen_retry = 0\n', port=self.port)
        code, out, err = self.brim('start')
        self.assertEqual(code, 1, out)
        self.assertEqual(err.count('\n'), 1, err)
        self.assertTrue(err.startswith('[wsgi] could not bind 127.0.0.1:%d: '
                                       % self.port), err)
        self.assertFalse(os.path.exists(self.pid_file))
        self.echo_ok(self.port)


class TestPlainApps(BrimTestCase):
    """call = package.module:app and :factory(), serve APP, brim.serve()."""

    def setUp(self):
        BrimTestCase.setUp(self)
        os.mkdir(os.path.join(self.tmp, 'mysite'))
        for name, source in PLAIN_APP_SOURCES.items():
            with open(os.path.join(self.tmp, name), 'w') as fp:
                fp.write(source)
        # The apps are found in the current directory, not on PYTHONPATH.
        self.env['PYTHONPATH'] = HERE

    def plain_conf(self, apps, call, workers=1):
        self.port = free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = %d
            apps = %s

            [app]
            call = %s

            [stats]
            call = brim.wsgi_stats.WSGIStats
            ''' % (self.port, workers, apps, call))

    def get(self, path='/', port=None):
        status, _headers, body = self.http(port or self.port, 'GET', path)
        self.assertEqual(status, 200, body)
        return body.decode()

    def run_attached(self, argv, name):
        """``argv`` (a brimd that stays attached): its stdout and stderr go
        to ``name``.out and ``name``.err; killed by pid at the end."""
        paths = [os.path.join(self.tmp, name + ext) for ext in ('.out',
                                                                '.err')]
        with open(paths[0], 'wb') as out, open(paths[1], 'wb') as err:
            proc = popen(argv, cwd=self.tmp, env=self.env, stdout=out,
                         stderr=err)
        self.track(proc.pid)
        self.addCleanup(kill_process, proc)
        proc.err_path = paths[1]
        return proc

    def serve(self, *args):
        """``brim.py [args]``, args ending with ``serve APP``."""
        return self.run_attached([sys.executable, BRIM] + list(args),
                                 'serve')

    def wait_serving(self, proc, port):
        """The workers, once ``proc`` logs (to stderr or to its log_file)
        that it serves ``port``."""
        line = re.compile(r'serving \[wsgi\] 127\.0\.0\.1:%d\b' % port)
        wait_until(lambda: proc.poll() is not None or line.search(
            self.log_text(proc.err_path) + self.log_text()), timeout=15)
        self.assertIsNone(proc.poll(), self.log_text(proc.err_path))
        self.seen_pids.update(descendants_of(proc.pid))
        return live_children_of(proc.pid)

    def stopped(self, proc, workers, code=0):
        self.assertEqual(proc.wait(15), code, self.log_text(proc.err_path))
        _protected.discard(proc.pid)
        self.assert_gone(workers)
        self.assertTrue(connect_refused(self.port))

    # -- call = package.module:name --------------------------------------

    def test_call_names_a_plain_wsgi_app(self):
        self.plain_conf('stats app', 'mysite.wsgi:application', workers=2)
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        pid = self.start()
        workers = live_children_of(pid)
        words = self.get('/any/path').split()
        self.assertEqual((words[0], words[2]), ('mysite', '/any/path'))
        self.assertIn(int(words[1]), workers)
        # WSGIStats in front answers its path; the app gets the rest.
        wait_until(lambda: self.stats(self.port)['wsgi']['request_count'])

    def test_factory_runs_once_in_each_worker(self):
        self.plain_conf('stats app', 'flaskish:create_app()', workers=2)
        pid = self.start()
        workers = sorted(live_children_of(pid))
        self.assertEqual(len(workers), 2)
        for _ in range(6):
            self.assertIn(int(self.get('/').split()[1]), workers)
        with open(os.path.join(self.tmp, 'factory-calls')) as fp:
            calls = sorted(int(line) for line in fp)
        self.assertEqual(calls, workers)    # never in the main process

    def test_factory_that_raises_fails_the_start(self):
        self.plain_conf('app', 'flaskish:create_broken()')
        self.assert_start_refused(
            self.port, r'^\[wsgi\] worker 0 failed to start: \[app\] call = '
            r'flaskish:create_broken\(\) raised RuntimeError: factory-marker'
            r'\n$')

    def test_plain_app_ends_the_chain(self):
        self.plain_conf('app stats', 'flaskish:app')
        line = ('[wsgi] apps: [app] call = flaskish:app is a plain WSGI app, '
                'which ends the chain, so [stats] after it would never be '
                'reached; list app last.\n')
        self.assertEqual(self.brim('check'), (1, '', line))
        self.assertEqual(self.assert_start_refused(self.port), line)

    def test_plain_app_spelling_and_type(self):
        for call, line in (
                ('flaskish:not_an_app', '[app] call = flaskish:not_an_app is '
                 'a str, not callable as a WSGI app.\n'),
                ('flaskish:create(x)', '[app] call = flaskish:create(x) is '
                 'not package.module:app or package.module:factory().\n')):
            self.plain_conf('app', call)
            self.assertEqual(self.brim('check'), (1, '', line))
        # The colon spelling serves a WSGI app as it is; a handler is a
        # class, named with dots.
        self.write_conf('''
            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo:TCPEcho
            ''' % free_port())
        self.assertEqual(self.brim('check'), (
            1, '', '[tcp] call = brim.tcp_echo:TCPEcho is not a dotted name '
            'like package.module.Class.\n'))

    # -- serve APP --------------------------------------------------------

    def test_serve_defaults_and_precedence(self):
        _parser, args = brim._parse_args(['serve', 'mysite.wsgi'])
        conf = brim._conf_of(args)
        self.assertEqual(conf.store, {
            'wsgi': {'apps': 'serve', 'ip': '127.0.0.1', 'port': '8000',
                     'workers': '2'},
            'serve': {'call': 'mysite.wsgi:application'}})
        # The flags win over the configuration, which wins over serve's
        # defaults; the app goes last in [wsgi]'s apps.
        path = self.write_conf('''
            [brim]
            workers = 3

            [wsgi]
            port = 8123
            apps = stats
            ''')
        _parser, args = brim._parse_args(['-c', path, '--ip', '::1', 'serve',
                                          'flaskish:create_app()'])
        conf = brim._conf_of(args)
        self.assertEqual(conf.store['wsgi'], {
            'apps': 'stats serve', 'ip': '::1', 'port': '8123'})
        self.assertEqual(conf.get_int('brim', 'workers', 0), 3)
        self.assertEqual(conf.store['serve'],
                         {'call': 'flaskish:create_app()'})
        with open(path, 'a') as fp:
            fp.write('\n[serve]\ncall = mine.Mine\n')
        with self.assertRaises(brim.ConfError) as caught:
            brim._conf_of(args)
        self.assertEqual(str(caught.exception), '%s has a [serve] section, '
                         'the name serve gives its app; rename that section.'
                         % path)

    def test_serve_without_a_configuration(self):
        self.port = free_port()
        proc = self.serve('serve', '--port', str(self.port),
                          'mysite.wsgi:application')
        workers = self.wait_serving(proc, self.port)
        self.assertEqual(len(workers), 2)
        self.assertEqual(listening_addresses(self.port), ['127.0.0.1'])
        words = self.get('/hello').split()
        self.assertEqual((words[0], words[2]), ('mysite', '/hello'))
        self.assertIn(int(words[1]), workers)
        self.assertFalse(os.path.exists(self.pid_file))
        # Logs on standard error: the request line among them.
        wait_until(lambda: ' GET /hello HTTP/1.1 200 ' in
                   self.log_text(proc.err_path))
        os.kill(proc.pid, signal.SIGINT)
        self.stopped(proc, workers)

    def test_serve_with_a_configuration_drains_on_sigterm(self):
        self.port = free_port()
        tcp_port = free_port()
        self.write_conf('''
            [wsgi]
            apps = stats

            [stats]
            call = brim.wsgi_stats.WSGIStats

            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho
            ''' % tcp_port)
        proc = self.serve('-c', self.conf_path, '--port', str(self.port),
                          '--workers', '1', 'serve', 'flaskish:app')
        self.wait_serving(proc, self.port)
        self.assertEqual(self.stats(self.port)['wsgi']['request_count'], 0)
        self.assertEqual(self.get('/other').split()[0], 'flaskish')
        self.assertEqual(tcp_exchange(tcp_port, b'echo me'), b'echo me')
        self.wait_for_log(r' GET /other HTTP/1.1 200 ')   # [brim] log_file
        workers = live_children_of(proc.pid)
        slow = {}

        def slow_request():
            slow['answer'] = self.http(self.port, 'GET', '/slow?1')
        client = threading.Thread(target=slow_request)
        client.start()
        self.addCleanup(client.join, 20)
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        os.kill(proc.pid, signal.SIGTERM)
        client.join(20)
        self.assertEqual(slow['answer'][0], 200)
        self.stopped(proc, workers)

    def test_serve_restarts_in_place(self):
        self.port = free_port()
        proc = self.serve('-p', self.pid_file, '--port', str(self.port),
                          '--workers', '1', 'serve', 'flaskish:create_app()')
        old_worker, = self.wait_serving(proc, self.port)
        os.kill(proc.pid, signal.SIGUSR2)
        # The re-executed brimd serves the same app, on the same port.
        wait_until(lambda: 'restarted in place 1 times' in
                   self.brim('status', conf=os.devnull)[1], timeout=20)
        self.assert_gone([old_worker])
        new_worker, = live_children_of(proc.pid)
        self.assertEqual(self.get('/').split(), ['flaskish', str(new_worker)])
        self.assertEqual(self.read_pid(), proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        self.stopped(proc, [new_worker])

    def test_brim_serve_from_python(self):
        self.port = free_port()
        script = os.path.join(self.tmp, 'vendored.py')
        with open(script, 'w') as fp:
            fp.write(SERVE_SCRIPT)
        proc = self.run_attached([sys.executable, script, str(self.port)],
                                 'script')
        workers = self.wait_serving(proc, self.port)
        self.assertEqual(len(workers), 2)
        status, _headers, body = self.http(self.port, 'POST', '/', b'12345')
        self.assertEqual(status, 200, body)
        words = body.split()
        self.assertEqual((words[0], words[2]), (b'script', b'5'))
        self.assertIn(int(words[1]), workers)   # served by a forked worker
        # The options are [wsgi]'s: max_body (a number), log_format.
        self.assertEqual(self.http(self.port, 'POST', '/', b'x' * 9)[0], 413)

        def request_record():
            for line in self.log_text(proc.err_path).splitlines():
                if line.startswith('{') and '"status": 200' in line:
                    return json.loads(line)
        self.assertEqual(wait_until(request_record)['bytes_in'], 5)
        os.kill(proc.pid, signal.SIGTERM)
        self.stopped(proc, workers)     # serve returned 0: the exit status


LIBAPP = '''
class App(object):

    def __init__(self, name, conf, next_app):
        pass

    def __call__(self, env, start_response):
        start_response('200 OK', [('Content-Length', '6')])
        return [b'libapp']
'''


class TestFirstRun(EchoTestCase):
    """What a first run meets: a busy port, a pid file or log it cannot
    write, an app it cannot import, a brimd running, hash-password
    without a NAME."""

    def test_busy_port_says_what_it_waits_for(self):
        self.echo_conf()
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(('127.0.0.1', self.port))
        holder.listen(1)
        # check fails at once.
        started = time.monotonic()
        code, out, err = self.brim('check')
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith('[wsgi] could not bind'), err)
        self.assertLess(time.monotonic() - started, 10)
        # start says at once what it waits for, and starts once it can.
        err_path = os.path.join(self.tmp, 'start.err')
        with open(err_path, 'wb') as err_file:
            proc = popen([sys.executable, BRIM, '-c', self.conf_path, '-p',
                          self.pid_file, 'start'], cwd=self.tmp, env=self.env,
                         stdout=subprocess.DEVNULL, stderr=err_file)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        notice = ('[wsgi] 127.0.0.1:%d is in use; retrying for 30s '
                  '(listen_retry)\n' % self.port)
        wait_until(lambda: self.log_text(err_path) == notice, timeout=5)
        holder.close()
        self.assertEqual(proc.wait(20), 0)
        _protected.discard(proc.pid)
        self.track(self.read_pid())
        self.assertEqual(self.log_text(err_path), notice)
        self.echo_ok(self.port)

    def test_pid_file_in_a_missing_directory(self):
        self.port = free_port()
        self.write_conf(ECHO_CONF % {'port': self.port, 'workers': 1,
                                     'dir': self.tmp, 'wsgi_extra': ''},
                        log_file=False)
        missing = os.path.join(self.tmp, 'missing')
        pid_file = os.path.join(missing, 'brimd.pid')
        line = ('Cannot write the pid file %s (there is no directory %s); '
                'use -p or [brim] pid_file to name another.\n'
                % (pid_file, missing))
        for command in ('start', 'foreground'):
            self.assertEqual(self.brim(command, pid_file=pid_file),
                             (1, '', line))
        self.assertTrue(connect_refused(self.port))

    @unittest.skipIf(brim._syslog_socket(), 'this host has a syslog socket')
    def test_fallback_log_that_cannot_be_opened(self):
        self.port = free_port()
        self.write_conf(ECHO_CONF % {'port': self.port, 'workers': 1,
                                     'dir': self.tmp, 'wsgi_extra': ''},
                        log_file=False)
        beside = os.path.join(self.tmp, 'brimd.log')
        os.mkdir(beside)
        self.assertEqual(self.brim('start'), (
            1, '', 'Cannot open the log file %s (Is a directory); a daemon '
            'with no syslog socket (/dev/log) and no [brim] log_file logs '
            'beside its pid file; set log_file, or move the pid file with -p '
            'or [brim] pid_file.\n' % beside))
        home = os.path.join(self.tmp, 'home')
        os.makedirs(os.path.join(home, '.brimd.log'))
        env = dict(self.env, HOME=home)
        self.assertEqual(self.brim('start', pid_file='-', env=env), (
            1, '', 'Cannot open the log file %s/.brimd.log (Is a directory); '
            'a daemon with no syslog socket (/dev/log), no [brim] log_file '
            'and no pid file (-p -) logs to ~/.brimd.log; set log_file.\n'
            % home))
        self.assertTrue(connect_refused(self.port))

    def test_log_file_that_cannot_be_opened(self):
        missing = os.path.join(self.tmp, 'missing', 'brim.log')
        self.port = free_port()
        self.write_conf('[brim]\nlog_file = %s\n' % missing + ECHO_CONF % {
            'port': self.port, 'workers': 1, 'dir': self.tmp,
            'wsgi_extra': ''}, log_file=False)
        line = ('Cannot open the log file %s (No such file or directory); '
                'change [brim] log_file.\n' % missing)
        self.assertEqual(self.brim('check'), (1, '', line))
        self.assertEqual(self.assert_start_refused(self.port), line)
        # A section's own log_file, which only its workers open.
        self.echo_conf(wsgi_extra='log_file = %s' % missing)
        self.assertEqual(self.assert_start_refused(self.port), (
            'Cannot open the log file %s (No such file or directory); '
            'change [wsgi] log_file.\n' % missing))

    def test_import_error_says_where_it_looked(self):
        os.mkdir(os.path.join(self.tmp, 'lib'))
        with open(os.path.join(self.tmp, 'lib', 'libapp.py'), 'w') as fp:
            fp.write(LIBAPP)
        self.env['PYTHONPATH'] = HERE       # not the temporary directory
        cwd = os.path.join(self.tmp, 'elsewhere')
        os.mkdir(cwd)
        port = free_port()
        conf = '''
            [brim]
            %s

            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = app

            [app]
            call = libapp.App
            '''
        self.write_conf(conf % ('', port))
        code, out, err = self.brim('check', cwd=cwd)
        self.assertEqual(code, 1, out)
        match = re.match(r"\[app\] call = libapp.App could not be imported: "
                         r"No module named 'libapp' \(looked in (.*); add its "
                         r"directory to \[brim\] pythonpath\)\n\Z", err)
        self.assertTrue(match, err)
        places = match.group(1).split(', ')
        self.assertEqual(places[0], '.')     # the current directory first
        self.assertIn(HERE.replace(os.path.expanduser('~'), '~', 1), places)
        self.assertNotIn(os.path.dirname(os.__file__), places)  # stdlib
        # pythonpath: a relative directory is taken from the current one,
        # not from the configuration's (their ../lib differ).
        self.write_conf(conf % ('pythonpath = ../nowhere, ../lib', port))
        pid = self.start(cwd=cwd)
        self.assertEqual(self.http(port, 'GET', '/')[2], b'libapp')
        self.stop()
        self.assert_gone([pid])

    def test_pythonpath_goes_first(self):
        saved = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), saved)
        brim._put_on_sys_path(brim._read_settings(brim.Conf({'brim': {
            'pythonpath': ' lib ,~/code,, /opt/app '}}), 'brim', 'brim')
            .pythonpath)
        self.assertEqual(sys.path[:4], [
            os.path.abspath('lib'), os.path.expanduser('~/code'), '/opt/app',
            os.getcwd()])
        self.assertEqual(sys.path[4:], [p for p in saved if p not in
                                        sys.path[:4]])

    def test_start_when_running_succeeds_foreground_does_not(self):
        self.echo_conf()
        pid = self.start()
        # init scripts (LSB): start of a running service succeeds.
        self.assertEqual(self.brim('start'),
                         (0, '%d already running\n' % pid, ''))
        # A supervisor's foreground must not exit 0 as if it had served.
        self.assertEqual(self.brim('foreground'),
                         (1, '', '%d already running\n' % pid))
        self.assertEqual(self.read_pid(), pid)
        self.echo_ok(self.port)

    def test_hash_password_without_name_prints_the_hash(self):
        code, out, err = run([sys.executable, BRIM, '-h'], env=self.env)
        self.assertIn('"NAME hash",', out)
        self.assertIn('without NAME,\n                just the hash', out)
        proc = popen([sys.executable, BRIM, 'hash-password'],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(b'pw\n', timeout=30)
        finally:
            _protected.discard(proc.pid)
        self.assertEqual((proc.returncode, err), (0, b''))
        encoded, = out.decode().split()
        self.assertTrue(brim._check_password(b'pw', brim._parse_hash(encoded)))


# ---------------------------------------------------------------------------
# 12. Reliability: restarts under load, faults, slow and stalled clients
# ---------------------------------------------------------------------------

DAEMON_SAMPLE = '''
[daemons]
daemons = sample

[sample]
call = brim.daemon_sample.DaemonSample
interval = 0.2
'''


class TestReliability(EchoTestCase):
    """brimd under restarts, dead parents, faulty apps and bad clients.

    Covered elsewhere: a broken conf on restart (TestCommands.
    test_restart_with_broken_conf_keeps_old_server), stop leaving nothing
    (test_stop_leaves_nothing), the 30 s graceful default
    (test_shutdown_finishes_in_flight_request), a pid file naming a live
    process that is not brimd (test_stop_and_status_ignore_unrelated_pid)
    and an app that raises or returns a str (TestSupervision).
    """

    def background_request(self, path, timeout=30):
        """GET ``path`` on a thread: (thread, result dict).  The result
        gets 'response' (status, headers, body) or 'error'."""
        result = {}

        def request():
            try:
                result['response'] = self.http(self.port, 'GET', path,
                                               timeout=timeout)
            except Exception as err:
                result['error'] = err
        thread = threading.Thread(target=request)
        thread.start()
        self.addCleanup(thread.join, timeout + 5)
        return thread, result

    def slow_started(self):
        """How many /slow requests the app has begun."""
        try:
            with open(os.path.join(self.tmp, 'slow-started')) as fp:
                return len(fp.read())
        except OSError:
            return 0

    # -- restarts ------------------------------------------------------------

    def test_five_restarts_under_load(self):
        self.echo_conf(workers=2)
        pid = self.start()
        hammer = Hammer(self.port, fresh=3, keep_alive=3).start()
        self.addCleanup(hammer.stop)
        began = time.monotonic()

        def both_kinds_answered(since):
            return lambda: all(hammer.ok[kind] >= since[kind] + 10
                               for kind in since)
        for command in ('restart', 'reload', 'force-reload', 'restart',
                        'reload'):
            old_tree = [pid] + live_children_of(pid)
            wait_until(both_kinds_answered(dict(hammer.ok)), timeout=15,
                       msg='both kinds of client answered before %s'
                       % command)
            code, out, err = self.brim(command)
            new_pid = self.read_pid()
            self.track(new_pid)
            self.assertEqual((code, err), (0, ''), '%s: %s' % (command, out))
            self.assertNotEqual(new_pid, pid, command)
            self.assertTrue(pid_alive(new_pid), command)
            self.assert_gone(old_tree, timeout=15)
            pid = new_pid
        wait_until(both_kinds_answered(dict(hammer.ok)), timeout=15,
                   msg='both kinds of client answered after the restarts')
        hammer.stop()
        figures = '%s in %.1fs over 5 restarts' % (
            hammer.figures(), time.monotonic() - began)
        self.assertEqual(hammer.errors[:10], [], figures)
        code, out, err = self.brim('status')
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % pid))

    def test_restart_with_failing_workers_keeps_old_server(self):
        """The new conf parses but a worker cannot start: restart fails and
        the old brimd serves on, its workers untouched, no request lost
        (not even to the new brimd's good workers, which serve meanwhile)."""
        self.echo_conf(workers=2)
        pid = self.start()
        workers = sorted(live_children_of(pid))
        broken = self.write_conf(ECHO_CONF % {
            'port': self.port, 'workers': 2, 'dir': self.tmp,
            'wsgi_extra': ''} + textwrap.dedent('''
            [wsgi#broken]
            ip = 127.0.0.1
            port = %d
            apps = raises

            [raises]
            call = myapps.InitRaises
            delay = 0.5
            ''' % free_port()), name='broken.conf')
        # Requests that take a while: some are in flight in the new
        # brimd's workers when its start fails.
        hammer = Hammer(self.port, fresh=4, keep_alive=4,
                        path='/slowecho?0.05').start()
        self.addCleanup(hammer.stop)
        wait_until(lambda: hammer.served >= 20)
        before = set(children_of(os.getpid()))
        code, out, err = self.brim('restart', conf=broken)
        self.assertEqual(code, 1, (out, err))
        self.assertIn('init-raises-marker', err)
        restart_err = err
        self.assertEqual(self.read_pid(), pid)
        wait_until(lambda: not [p for p in set(children_of(os.getpid())) -
                                before if pid_alive(p)],
                   msg='the failed new brimd left processes')
        served = hammer.served
        wait_until(lambda: hammer.served >= served + 20)
        hammer.stop()
        self.assertEqual(hammer.errors[:10], [], hammer.figures())
        self.assertEqual(sorted(live_children_of(pid)), workers)
        code, out, err = self.brim('status')
        self.assertEqual((code, out.splitlines()[0]),
                         (0, '%d is running' % pid))
        self.assertEqual(restart_err.count('\n'), 1, restart_err)

    # -- ending: graceful_timeout, stop, a killed main process ---------------

    def test_graceful_timeout_cuts_off_a_long_request(self):
        self.echo_conf(brim_extra='graceful_timeout = 1')
        pid = self.start()
        workers = live_children_of(pid)
        client, result = self.background_request('/slow?10')
        wait_until(lambda: self.slow_started() == 1)
        began = time.monotonic()
        code, out, err = self.brim('shutdown')
        took = time.monotonic() - began
        self.assertEqual((code, err), (0, ''), out)
        self.assertGreater(took, 0.9, 'did not wait graceful_timeout')
        self.assertLess(took, 4.0, 'graceful_timeout = 1 was not applied')
        self.assert_gone([pid] + workers, timeout=2)
        client.join(15)
        self.assertFalse(client.is_alive())
        if 'response' in result:    # anything but the whole answer
            status, _h, body = result['response']
            self.assertNotEqual((status, body),
                                (200, b'slow:' + b'x' * 5000 + b':done'))
        self.wait_for_log(r'(?i)\bkill(ed|ing)?\b.*\bworkers?\b|'
                          r'\bworkers?\b.*\bkill(ed|ing)?\b', timeout=2)

    def test_shutdown_finishes_a_pipelined_request(self):
        """The second of two pipelined requests is running when a shutdown
        starts: it is answered whole, then the connection ends."""
        self.echo_conf()
        pid = self.start()
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b'GET /here HTTP/1.1\r\nHost: x\r\n\r\n'
                     b'GET /slow?1 HTTP/1.1\r\nHost: x\r\n\r\n')
        wait_until(lambda: os.path.exists(os.path.join(self.tmp,
                                                       'slow-started')))
        os.kill(pid, signal.SIGHUP)
        fp = sock.makefile('rb')
        first, second = read_response(fp), read_response(fp)
        self.assertEqual((first.status, first.body), (200, b'Hello World!\n'))
        self.assertEqual(second.status, 200)
        self.assertTrue(second.body.endswith(b':done'), second.body[-20:])
        self.assertEqual(fp.read(), b'')

    def test_stop_is_immediate_with_a_request_in_flight(self):
        self.echo_conf(extra=DAEMON_SAMPLE)
        pid = self.start()
        children = live_children_of(pid)
        self.assertEqual(len(children), 2)      # the worker and the daemon
        client, result = self.background_request('/slow?10')
        wait_until(lambda: self.slow_started() == 1)
        began = time.monotonic()
        self.stop()
        self.assertLess(time.monotonic() - began, 3.0)
        self.assert_gone([pid] + children, timeout=2)
        client.join(5)
        self.assertFalse(client.is_alive(), 'the client still waits')
        self.assertIn('error', result)
        self.assertTrue(connect_refused(self.port))
        self.assertFalse(os.path.exists(self.pid_file))

    def test_killed_main_process_takes_workers_and_daemons_along(self):
        """After SIGKILL of the main process its workers and daemons notice
        the parent is gone and exit.  They are reparented (to init or, as
        a subreaper, to this test process, which reaps them): pid_alive
        counts a zombie as gone."""
        self.echo_conf(workers=2, extra=DAEMON_SAMPLE)
        pid = self.start()
        children = live_children_of(pid)
        self.assertEqual(len(children), 3)
        self.echo_ok(self.port)
        os.kill(pid, signal.SIGKILL)
        self.assert_gone([pid] + children, timeout=5)
        self.assertTrue(connect_refused(self.port), 'a worker still holds '
                        'the listening socket')

    # -- supervision ---------------------------------------------------------

    def test_replaced_workers_leave_no_zombies(self):
        self.echo_conf(extra=DAEMON_SAMPLE)
        pid = self.start()
        worker = int(self.http(self.port, 'GET', '/pid')[2])
        [daemon] = [p for p in live_children_of(pid) if p != worker]
        old = [worker, daemon]
        os.kill(worker, signal.SIGKILL)
        os.kill(daemon, signal.SIGTERM)
        wait_until(lambda: not set(old) & set(children_of(pid)), timeout=3,
                   msg='the main process reaped its dead children')
        self.assertEqual(zombie_children(pid), [])
        wait_until(lambda: len(live_children_of(pid)) == 2, timeout=10,
                   msg='both replaced')
        self.echo_ok(self.port)
        self.assertEqual(zombie_children(pid), [])

    def test_worker_crashing_at_start_is_backed_off(self):
        """A worker whose app cannot be built is restarted after 1, 2, 4 s
        and so on, logged each time; the rest serves; the main idles."""
        starts = os.path.join(self.tmp, 'starts')
        flag = os.path.join(self.tmp, 'flag')
        self.port, other = free_port(), free_port()
        self.write_conf('''
            [wsgi]
            ip = 127.0.0.1
            port = %d
            apps = crashy misc

            [crashy]
            call = myapps.CrashInInit
            starts = %s
            flag = %s

            [misc]
            call = myapps.Misc

            [wsgi#other]
            ip = 127.0.0.1
            port = %d
            apps = echo

            [echo]
            call = brim.wsgi_echo.WSGIEcho
            ''' % (self.port, starts, flag, other))

        def start_times():
            with open(starts) as fp:
                return [float(line) for line in fp]
        pid = self.start()
        worker = int(self.http(self.port, 'GET', '/pid')[2])
        cpu = cpu_seconds(pid)
        open(flag, 'w').close()
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        [kill_line] = self.wait_for_log(r'\(pid %d\) killed by signal '
                                        r'SIGKILL' % worker)
        # The restart after the kill, then one more: both crash.
        wait_until(lambda: len(start_times()) >= 3, timeout=8)
        self.echo_ok(other)
        crashes = self.wait_for_log(
            r'\[wsgi\] worker 0 \(pid \d+\) exit status 1 after [\d.]+s; '
            r'restarting in [\d.]+s', count=2, timeout=3)
        delays = [float(re.search(r'restarting in ([\d.]+)s$', line)
                        .group(1)) for line in [kill_line] + crashes]
        first, second = start_times()[1:3]
        self.assertTrue(0 <= delays[0] <= 1.0, kill_line)
        self.assertTrue(1.0 <= delays[1] <= 2.0, crashes)
        self.assertEqual(delays[2], 2 * delays[1], crashes)
        self.assertGreater(first - killed, delays[0] - 0.1)
        self.assertLess(first - killed, delays[0] + 0.8)
        self.assertGreater(second - first, delays[1] - 0.1)
        self.assertLess(second - first, delays[1] + 0.8)
        self.wait_for_log(r'crash-in-init-marker', count=2)
        self.echo_ok(other)
        self.assertLess(cpu_seconds(pid) - cpu, 0.5, 'main process busy')
        self.assertTrue(pid_alive(pid))

    # -- clients that are slow, stall or come too many ----------------------

    def test_slow_clients_do_not_starve_others(self):
        """300 connections dribble a request head at a byte a second; a
        normal client is still answered in well under a second, and every
        dribbling connection is still served once it finishes its head."""
        self.echo_conf()
        self.start()
        slow = []
        self.addCleanup(lambda: [sock.close() for sock in slow])
        for _ in range(300):
            slow.append(socket.create_connection(('127.0.0.1', self.port),
                                                 timeout=10))
        head = b'GET /here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
        latencies = []
        began = time.monotonic()
        for second in range(3):
            for sock in slow:
                sock.sendall(head[second:second + 1])
            while time.monotonic() < began + second + 1:
                if len(latencies) < 6 * (second + 1):
                    sent = time.monotonic()
                    self.echo_ok(self.port)
                    latencies.append(time.monotonic() - sent)
                else:
                    time.sleep(0.05)    # pacing the dribble, not syncing
        self.assertEqual(len(latencies), 18)
        self.assertLess(max(latencies), 1.0, latencies)
        for sock in slow:
            sock.sendall(head[3:])
        answers = [read_response(sock.makefile('rb')) for sock in slow]
        self.assertEqual([(a.status, a.body) for a in answers],
                         [(200, b'Hello World!\n')] * 300)

    def test_client_timeout_closes_idle_and_stalled_connections(self):
        self.echo_conf(wsgi_extra='client_timeout = 1\n')
        self.start()
        idle = HTTPClient(self.port)
        self.addCleanup(idle.close)
        self.assertEqual(idle.request('GET', '/here').status, 200)
        silent = socket.create_connection(('127.0.0.1', self.port),
                                          timeout=5)
        self.addCleanup(silent.close)
        stalled = socket.create_connection(('127.0.0.1', self.port),
                                           timeout=5)
        self.addCleanup(stalled.close)
        stalled.sendall(b'GET /here HTTP/1.1\r\nHo')
        began = time.monotonic()

        def until_closed(sock):
            """(every byte until EOF, seconds from ``began``)."""
            return read_until_closed(sock), time.monotonic() - began
        # An idle keep-alive connection and one that never sent a byte
        # are closed without a word; a half-sent head gets a 408.
        for name, sock in (('idle keep-alive', idle.sock),
                           ('silent', silent)):
            data, took = until_closed(sock)
            self.assertEqual(data, b'', name)
            self.assertTrue(0.8 < took < 3.0, '%s closed after %.2fs'
                            % (name, took))
        data, took = until_closed(stalled)
        self.assertTrue(0.8 < took < 3.0, 'stalled closed after %.2fs' % took)
        self.assertTrue(data.startswith(b'HTTP/1.1 408 '), data)
        response = read_response(io.BytesIO(data))
        self.assertEqual(response.status, 408, data)
        self.assertEqual(response.headers.get('connection'), 'close')
        self.assertEqual(response.body, b'408 Request Timeout\n')
        self.wait_for_log(r'refused 408')

    def test_concurrent_per_worker_queues_the_next_connection(self):
        self.echo_conf(wsgi_extra='concurrent_per_worker = 2\n')
        pid = self.start()
        [worker] = live_children_of(pid)
        finished = []

        def slow_client():
            client = HTTPClient(self.port, timeout=20)
            try:
                response = client.request('GET', '/slow?1.5')
                finished.append((time.monotonic(), response.status))
            finally:
                client.close()      # only now is the slot free
        threads = [threading.Thread(target=slow_client) for _ in range(2)]
        for thread in threads:
            thread.start()
            self.addCleanup(thread.join, 20)
        wait_until(lambda: self.slow_started() == 2)
        third = HTTPClient(self.port, timeout=20)
        self.addCleanup(third.close)
        response = third.request('GET', '/pid')     # not refused: queued
        answered = time.monotonic()
        for thread in threads:
            thread.join(20)
        self.assertEqual((response.status, response.body),
                         (200, str(worker).encode()))
        self.assertEqual([status for _t, status in finished], [200, 200])
        self.assertGreater(answered, min(t for t, _s in finished),
                           'the third connection was served while both '
                           'slots were busy')

    # -- apps that break WSGI ------------------------------------------------

    def test_app_faults_answer_500_and_the_worker_serves_on(self):
        self.echo_conf()
        pid = self.start()
        [worker] = live_children_of(pid)
        explanations = {
            'nostart_list': 'start_response',
            'nostart_bytes': 'start_response',
            'nostart_empty': 'start_response',
            'header_int': "('X-Count', 1)",
            'header_bytes': "(b'X-Name', 'v')",
        }
        for fault, explanation in explanations.items():
            with self.subTest(fault=fault):
                status, _h, body = self.http(self.port, 'GET',
                                             '/fault?' + fault)
                self.assertEqual(status, 500, body)
                self.assertNotIn(b'no start_response', body)
                txn = re.search(rb'txn (\S+)', body).group(1).decode()
                lines = self.wait_for_log(r' ERROR %s GET /fault: the app '
                                          % re.escape(txn))
                self.assertIn(explanation, lines[0])
                self.assertIn('start_response', lines[0])
                self.echo_ok(self.port)
                self.assertEqual(int(self.http(self.port, 'GET', '/pid')[2]),
                                 worker)
        self.assertEqual(live_children_of(pid), [worker])


# ---------------------------------------------------------------------------
# 13. Dropping privileges (needs root)
# ---------------------------------------------------------------------------

def free_low_port():
    """A free port under 1024: only root can bind it."""
    for port in range(1023, 899, -1):
        sock = socket.socket()
        try:
            sock.bind(('127.0.0.1', port))
            return port
        except OSError:
            continue
        finally:
            sock.close()
    raise unittest.SkipTest('no free port under 1024')


@unittest.skipUnless(hasattr(os, 'geteuid') and os.geteuid() == 0,
                     'needs root to switch users')
class TestPrivileges(EchoTestCase):
    """[brim] user/group/umask: binding and the pid file stay root's, the
    workers and daemons run as the user."""

    def setUp(self):
        EchoTestCase.setUp(self)
        try:
            self.user = pwd.getpwnam('nobody')
        except KeyError:
            self.skipTest('no user nobody')
        self.group = grp.getgrgid(self.user.pw_gid).gr_name

    def privileged_conf(self):
        self.echo_conf(
            brim_extra='user = nobody\ngroup = %s\numask = 0027\n'
            % self.group, extra=DAEMON_SAMPLE)

    def test_workers_and_daemons_run_as_the_user(self):
        # This test is about ids: let nobody reach its log file.
        os.chmod(self.tmp, 0o755)
        open(self.log_file, 'w').close()
        os.chown(self.log_file, self.user.pw_uid, self.user.pw_gid)
        self.privileged_conf()
        low = free_low_port()
        with open(self.conf_path) as fp:
            text = fp.read()
        self.port = low
        with open(self.conf_path, 'w') as fp:
            fp.write(re.sub(r'(?m)^port = \d+$', 'port = %d' % low, text))
        pid = self.start()
        self.echo_ok(low)
        self.assertEqual(listening_addresses(low), ['127.0.0.1'])
        self.assertEqual(os.stat(self.pid_file).st_uid, 0)
        self.assertEqual(proc_status(pid)['Uid'].split(), ['0'] * 4)
        children = live_children_of(pid)
        self.assertEqual(len(children), 2)      # the worker and the daemon
        for child in children:
            status = proc_status(child)
            with self.subTest(child=proc_cmdline(child)):
                self.assertEqual(status['Uid'].split(),
                                 [str(self.user.pw_uid)] * 4)
                self.assertEqual(status['Gid'].split(),
                                 [str(self.user.pw_gid)] * 4)
                self.assertEqual(status['Groups'].split(), [])
                self.assertEqual(status['Umask'], '0027')

    def test_log_file_in_a_root_only_directory(self):
        """Workers (nobody) still log to a file only root can open: the
        temporary directory is 0700 root."""
        self.assertEqual(os.stat(self.tmp).st_mode & 0o777, 0o700)
        self.privileged_conf()
        self.start()
        self.echo_ok(self.port)
        worker = int(self.http(self.port, 'GET', '/pid')[2])
        self.assertEqual(proc_status(worker)['Uid'].split()[0],
                         str(self.user.pw_uid))
        self.wait_for_log(r' POST /echo HTTP/1.1 200 ')
        self.wait_for_log(r'sample daemon alive')


# ---------------------------------------------------------------------------
# 14. max_requests: workers recycled after so many requests
# ---------------------------------------------------------------------------

class TestMaxRequests(EchoTestCase):
    """max_requests (+ max_requests_jitter): a worker that served that many
    requests, connections or datagrams exits and is replaced at once."""

    def pids_of(self, requests):
        """The worker pid that answered each of ``requests`` GET /pid on
        new connections."""
        pids = []
        for _ in range(requests):
            status, _h, body = self.http(self.port, 'GET', '/pid')
            self.assertEqual(status, 200, body)
            pids.append(int(body))
        return pids

    def test_worker_recycled_every_max_requests(self):
        self.echo_conf(wsgi_extra='max_requests = 5\n')
        self.start()
        began = time.monotonic()
        pids = self.pids_of(23)
        took = time.monotonic() - began
        runs = [len(list(group)) for _pid, group in itertools.groupby(pids)]
        self.assertLessEqual(max(runs), 5, pids)
        self.assertGreaterEqual(len(runs), 5, pids)     # 4 changes or more
        self.assertEqual(len(set(pids)), len(runs), 'a worker came back')
        self.assertLess(took, 10.0, 'replacements were backed off')
        # Keep-alive: a recycled worker ends its connection between
        # requests; a request on a reused connection may be retried once.
        client = HTTPClient(self.port)
        self.addCleanup(client.close)
        retries = 0
        pids = []
        for _ in range(12):
            try:
                response = client.request('GET', '/pid')
            except StaleConnection:
                retries += 1
                response = client.request('GET', '/pid')
            self.assertEqual(response.status, 200, response.body)
            pids.append(int(response.body))
        self.assertGreaterEqual(len(set(pids)), 2, (pids, retries))
        self.assertGreaterEqual(len(self.wait_for_log(r'recycl', count=4)), 4)

    def test_jitter_bounds_each_worker(self):
        self.echo_conf(
            wsgi_extra='max_requests = 2\nmax_requests_jitter = 2\n')
        self.start()
        pids = self.pids_of(20)
        runs = [len(list(group)) for _pid, group in itertools.groupby(pids)]
        self.assertTrue(all(2 <= run <= 4 for run in runs[:-1]), pids)
        self.assertLessEqual(runs[-1], 4, pids)

    def test_tcp_and_udp_workers_recycled(self):
        tcp, udp = free_port(), free_udp_port()
        self.write_conf('''
            [brim]
            max_requests = 3
            ip = 127.0.0.1

            [tcp]
            port = %d
            call = mytcp.Pid

            [udp]
            port = %d
            call = myudp.Pid
            ''' % (tcp, udp))
        self.start()
        for kind, ask in (('tcp', lambda: tcp_exchange(tcp, b'')),
                          ('udp', lambda: udp_exchange(udp, b'pid?'))):
            with self.subTest(kind=kind):
                pids = [int(ask()) for _ in range(10)]
                runs = [len(list(group))
                        for _pid, group in itertools.groupby(pids)]
                self.assertLessEqual(max(runs), 3, pids)
                self.assertGreaterEqual(len(runs), 4, pids)

    def test_bad_max_requests_fails_start(self):
        for value in ('-1', 'abc'):
            with self.subTest(value=value):
                self.echo_conf(wsgi_extra='max_requests = %s\n' % value)
                self.assert_start_refused(self.port, 'max_requests')


# ---------------------------------------------------------------------------
# 14b. Unix sockets: ip = unix:PATH
# ---------------------------------------------------------------------------

UNIX_ENV_APP = '''
import json


def application(env, start_response):
    body = json.dumps({k: env[k] for k in (
        'REMOTE_ADDR', 'REMOTE_PORT', 'SERVER_NAME', 'SERVER_PORT')})
    start_response('200 OK', [('Content-Type', 'application/json'),
                              ('Content-Length', str(len(body)))])
    return [body.encode()]
'''


class UnixHTTPConnection(httpclient.HTTPConnection):
    """http.client over a Unix stream socket."""

    def __init__(self, path, timeout=10):
        httpclient.HTTPConnection.__init__(self, 'localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class TestUnixSocket(BrimTestCase):
    """ip = unix:PATH: a [wsgi] or [tcp] listens on a Unix socket file,
    which a crash may leave (replaced), a live process holds (refused),
    restart keeps and stop removes."""

    def unix_conf(self, extra='', name='brimd.conf', path=None):
        self.sock_path = path or os.path.join(self.tmp, 'app.sock')
        with open(os.path.join(self.tmp, 'unixenv.py'), 'w') as fp:
            fp.write(UNIX_ENV_APP)
        return self.write_conf('''
            [wsgi]
            ip = unix:%s
            workers = 2
            apps = env
            %s

            [env]
            call = unixenv:application
            ''' % (self.sock_path, extra), name=name)

    def unix_http(self, path='/', headers=None, sock_path=None):
        conn = UnixHTTPConnection(sock_path or self.sock_path)
        try:
            conn.request('GET', path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def unix_raw(self, data):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.sock_path)
        try:
            sock.sendall(data)
            return read_until_closed(sock)
        finally:
            sock.close()

    def test_wsgi_on_unix_socket(self):
        self.unix_conf()
        self.start()
        mode = os.lstat(self.sock_path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o660)
        status, body = self.unix_http(headers={'Host': 'example.com:8080'})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {
            'REMOTE_ADDR': '', 'REMOTE_PORT': '',
            'SERVER_NAME': 'example.com', 'SERVER_PORT': '8080'})
        self.assertEqual(json.loads(self.unix_http(headers={
            'Host': '[::1]'})[1])['SERVER_NAME'], '[::1]')
        # HTTP/1.0 without a Host: the socket's path names the server.
        reply = self.unix_raw(b'GET / HTTP/1.0\r\n\r\n')
        self.assertEqual(json.loads(reply.split(b'\r\n\r\n', 1)[1]), {
            'REMOTE_ADDR': '', 'REMOTE_PORT': '',
            'SERVER_NAME': self.sock_path, 'SERVER_PORT': ''})
        line = self.wait_for_log(r'GET / HTTP/1\.0 200')[0]
        self.assertRegex(line, r'NOTICE \w+ - - - - ')
        address = 'unix:%s' % self.sock_path
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        self.assertIn('[wsgi] wsgi on %s (held by the running brimd), 2 '
                      'workers' % address, out)
        self.assertIn('  [wsgi] %s\n' % address, self.brim('status')[1])
        self.stop()
        self.assertFalse(os.path.exists(self.sock_path))

    def test_socket_mode(self):
        self.unix_conf('socket_mode = 600')
        self.start()
        self.assertEqual(stat.S_IMODE(os.lstat(self.sock_path).st_mode),
                         0o600)
        self.assertEqual(self.unix_http()[0], 200)

    @unittest.skipUnless(hasattr(os, 'geteuid') and os.geteuid() == 0,
                         'needs root to give the file to another user')
    def test_socket_file_owned_by_user_and_group(self):
        try:
            user = pwd.getpwnam('nobody')
        except KeyError:
            self.skipTest('no user nobody')
        group = grp.getgrgid(user.pw_gid).gr_name
        self.unix_conf()
        with open(self.conf_path) as fp:
            text = fp.read()
        with open(self.conf_path, 'w') as fp:
            fp.write(text.replace('[brim]\n', '[brim]\nuser = nobody\n'
                                  'group = %s\n' % group, 1))
        self.start()
        info = os.lstat(self.sock_path)
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(
            info.st_mode)), (user.pw_uid, user.pw_gid, 0o660))
        self.assertEqual(self.unix_http()[0], 200)
        self.stop()
        self.assertFalse(os.path.exists(self.sock_path))

    def test_relative_path_and_tls(self):
        """A relative path is taken from the current directory (stop
        removes it all the same); certfile makes it speak HTTPS."""
        cert, key = self_signed()
        for name, text in (('cert.pem', cert), ('key.pem', key)):
            with open(os.path.join(self.tmp, name), 'w') as fp:
                fp.write(text)
        self.unix_conf('certfile = cert.pem\n            keyfile = key.pem',
                       path='app.sock')
        self.start()
        path = os.path.join(self.tmp, 'app.sock')
        context = ssl.create_default_context(
            cafile=os.path.join(self.tmp, 'cert.pem'))
        context.check_hostname = False
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(10)
        raw.connect(path)
        with context.wrap_socket(raw) as tls:
            tls.sendall(b'GET / HTTP/1.0\r\nHost: example.com\r\n\r\n')
            reply = b''
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                reply += chunk
        self.assertTrue(reply.startswith(b'HTTP/1.1 200 '), reply)
        self.assertEqual(json.loads(reply.split(b'\r\n\r\n', 1)[1])[
            'SERVER_NAME'], 'example.com')
        self.stop()
        self.assertFalse(os.path.exists(path))

    def test_stale_socket_file_is_replaced(self):
        self.unix_conf()
        crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        crashed.bind(self.sock_path)     # closed unlistened: a crash's file
        crashed.close()
        code, out, err = self.brim('check')
        self.assertEqual((code, err), (0, ''), out)
        self.assertIn('(free to bind)', out)
        self.assertTrue(os.path.exists(self.sock_path))  # check left it
        self.start()
        self.assertEqual(self.unix_http()[0], 200)

    def test_live_socket_refuses_start(self):
        self.unix_conf()
        pid = self.start()
        other = self.unix_conf(name='other.conf', path=self.sock_path)
        other_pid = os.path.join(self.tmp, 'other.pid')
        code, out, err = self.brim('start', conf=other, pid_file=other_pid)
        self.assertEqual(code, 1, (out, err))
        self.assertEqual(err, '[wsgi] ip = unix:%s: a running process '
                         'listens on it (stop that one, or change ip in '
                         '[wsgi]).\n' % self.sock_path)
        self.assertFalse(os.path.exists(other_pid))
        self.assertTrue(pid_alive(pid))
        self.assertEqual(self.unix_http()[0], 200)

    def test_bad_unix_addresses_refuse_start(self):
        missing = os.path.join(self.tmp, 'nowhere', 'app.sock')
        self.unix_conf(path=missing)
        code, out, err = self.brim('start')
        self.assertEqual((code, err), (1, '[wsgi] ip = unix:%s: the '
                         'directory %s does not exist.\n'
                         % (missing, os.path.dirname(missing))), out)
        self.unix_conf(path=' ')
        code, out, err = self.brim('start')
        self.assertEqual((code, err), (1, '[wsgi] ip = unix: names no '
                         'socket file; give its path '
                         '(unix:/run/brim/app.sock).\n'), out)
        self.write_conf('''
            [udp]
            ip = unix:%s/udp.sock
            call = brim.udp_echo.UDPEcho
            ''' % self.tmp)
        code, out, err = self.brim('start')
        self.assertEqual(code, 1, out)
        self.assertEqual(err, '[udp] ip = unix:%s/udp.sock: a [udp] '
                         'subserver cannot listen on a Unix socket; use an '
                         'IP address.\n' % self.tmp)
        self.assertFalse(os.path.exists(self.pid_file))

    def test_restart_keeps_the_socket_file(self):
        self.unix_conf()
        pid = self.start()
        inode = os.lstat(self.sock_path).st_ino
        box = {'ok': 0, 'errors': []}
        done = threading.Event()

        def loop():
            while not done.is_set():
                try:
                    status = self.unix_http()[0]
                    if status == 200:
                        box['ok'] += 1
                    else:
                        box['errors'].append(status)
                except OSError as err:
                    box['errors'].append(repr(err))
        thread = threading.Thread(target=loop)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(done.set)
        wait_until(lambda: box['ok'] >= 20, msg='served before restart')
        code, out, err = self.brim('restart')
        self.assertEqual((code, err), (0, ''), out)
        new_pid = self.read_pid()
        self.track(new_pid)
        self.assertNotEqual(new_pid, pid)
        self.assert_gone([pid], timeout=15)
        since = box['ok']
        wait_until(lambda: box['ok'] >= since + 20,
                   msg='served after restart')
        done.set()
        thread.join(30)
        self.assertEqual(box['errors'][:10], [])
        # The same file: the new brimd took the socket over.
        self.assertEqual(os.lstat(self.sock_path).st_ino, inode)
        self.stop()
        self.assertFalse(os.path.exists(self.sock_path))

    def test_restart_in_place_keeps_the_socket(self):
        self.unix_conf()
        pid = self.start()
        old_workers = live_children_of(pid)
        inode = os.lstat(self.sock_path).st_ino
        os.kill(pid, signal.SIGUSR2)
        wait_until(lambda: re.search(r'restarted in place 1 times',
                                     self.brim('status')[1]), timeout=20)
        self.assert_gone(old_workers, timeout=15)
        self.assertEqual(self.read_pid(), pid)
        # The same file: the socket was inherited, not bound again.
        self.assertEqual(os.lstat(self.sock_path).st_ino, inode)
        self.assertEqual(self.unix_http()[0], 200)
        self.assertNotIn('listens on it', self.log_text())
        self.stop()
        self.assertFalse(os.path.exists(self.sock_path))

    def test_tcp_handler_on_unix_socket(self):
        path = os.path.join(self.tmp, 'tcp.sock')
        self.write_conf('''
            [tcp]
            ip = unix:%s
            call = brim.tcp_echo.TCPEcho
            ''' % path)
        self.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(b'over a unix socket')
            got = b''
            while len(got) < 18:
                chunk = sock.recv(64)
                if not chunk:
                    break
                got += chunk
        finally:
            sock.close()
        self.assertEqual(got, b'over a unix socket')
        self.stop()
        self.assertFalse(os.path.exists(path))

    def test_systemd_unix_socket_activation(self):
        activate = shutil.which('systemd-socket-activate')
        if activate is None:
            self.skipTest('needs systemd-socket-activate (Debian package '
                          'systemd)')
        self.unix_conf('listen_retry = 0')
        proc = self.run_attached('foreground', prefix=[
            activate, '-l', self.sock_path, '-E', 'PYTHONPATH'])
        wait_until(lambda: os.path.exists(self.sock_path))
        # The first connection starts brimd, which takes the socket by its
        # path rather than binding one.
        self.assertEqual(self.unix_http()[0], 200)
        wait_until(lambda: self.read_pid() == proc.pid, timeout=15)
        self.assertNotIn('listens on it', self.log_text())
        # A restart in place (systemd's ExecReload) still knows the file
        # is systemd's.
        os.kill(proc.pid, signal.SIGUSR2)
        wait_until(lambda: re.search(r'restarted in place 1 times',
                                     self.brim('status')[1]), timeout=20)
        self.assertEqual(self.unix_http()[0], 200)
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)
        self.assertTrue(os.path.exists(self.sock_path))     # systemd's file

    def start_nginx(self, site):
        """Run nginx in the foreground as a child, serving ``site`` (a
        server block, %(port)d and %(sock)s filled in) on a free loopback
        port; return the port."""
        nginx = shutil.which('nginx') or (
            '/usr/sbin/nginx' if os.path.exists('/usr/sbin/nginx') else None)
        if nginx is None:
            self.skipTest('needs the Debian package nginx')
        port = free_port()
        conf = os.path.join(self.tmp, 'nginx.conf')
        fill = {'tmp': self.tmp, 'port': port, 'sock': self.sock_path}
        with open(conf, 'w') as fp:
            fp.write(NGINX_CONF % dict(fill, site=site % fill))
        log = open(os.path.join(self.tmp, 'nginx.out'), 'wb')
        self.addCleanup(log.close)
        proc = popen([nginx, '-c', conf, '-p', self.tmp, '-e', 'stderr'],
                     stdout=log, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL)
        self.addCleanup(end_process, proc)
        wait_until(lambda: proc.poll() is not None or
                   not connect_refused(port), msg='nginx listening')
        self.assertIsNone(proc.poll(), self.log_text(
            os.path.join(self.tmp, 'nginx.out')))
        return port

    def keep_alive_gets(self, port, path, count):
        """``count`` GETs of ``path`` on one connection, each answered 200;
        the last answer's body, as JSON."""
        conn = httpclient.HTTPConnection('127.0.0.1', port, timeout=10)
        self.addCleanup(conn.close)
        for _ in range(count):
            conn.request('GET', path)
            resp = conn.getresponse()
            body = resp.read()
            self.assertEqual(resp.status, 200, body)
        return json.loads(body)

    def test_behind_nginx(self):
        self.unix_conf()
        self.start()
        port = self.start_nginx(NGINX_PLAIN_SITE)
        self.assertEqual(self.keep_alive_gets(port, '/', 50), {
            'REMOTE_ADDR': '', 'REMOTE_PORT': '',
            'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': str(port)})

    def test_behind_nginx_as_the_readme_site(self):
        # The site the README's Deployment section shows: an upstream on
        # the Unix socket with keepalive, nginx saying the client came
        # over https and from where.
        self.unix_conf()
        with open(os.path.join(self.tmp, 'unixenv.py'), 'w') as fp:
            fp.write(FORWARDED_ENV_APP)
        self.start()
        port = self.start_nginx(NGINX_SITE)
        seen = self.keep_alive_gets(port, '/some/path?q=1', 20)
        self.assertEqual(seen['wsgi.url_scheme'], 'https')
        self.assertEqual(seen['HTTPS'], 'on')
        self.assertEqual(seen['brim.client_addr'], '127.0.0.1')
        self.assertEqual(seen['HTTP_HOST'], '127.0.0.1')
        self.assertEqual(seen['request_uri'],
                         'https://127.0.0.1/some/path?q=1')
        wait_until(lambda: len(self.request_lines()) >= 20,
                   msg='request lines logged')
        for line in self.request_lines():
            self.assertEqual(line['path'], '/some/path?q=1', line)
            # The client field: what nginx forwarded, not the socket.
            client = line['line'].split(' NOTICE ')[1].split(' ')[1]
            self.assertEqual(client, '127.0.0.1', line['line'])

    def test_readme_site_is_the_tested_one(self):
        # The Deployment section's upstream and location, line for line.
        with open(os.path.join(HERE, 'README')) as fp:
            readme = fp.read()

        def blocks(text):
            lines = [l.strip() for l in text.splitlines()]
            up = lines.index('upstream brim {')
            loc = lines.index('location / {')
            return (lines[up + 2:lines.index('}', up)],
                    lines[loc + 1:lines.index('}', loc)])
        self.assertIn('    upstream brim {\n'
                      '        server unix:/run/brim/app.sock;\n', readme)
        self.assertEqual(blocks(readme), blocks(NGINX_SITE))
        self.assertIn('        server b1 127.0.0.1:8901 send-proxy-v2\n',
                      readme)

    def test_restart_under_load_behind_nginx(self):
        self.unix_conf()
        pid = self.start()
        port = self.start_nginx(NGINX_SITE)
        box = {'ok': 0, 'errors': []}
        done = threading.Event()

        def loop():
            conn = httpclient.HTTPConnection('127.0.0.1', port, timeout=10)
            while not done.is_set():
                try:
                    conn.request('GET', '/')
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        box['ok'] += 1
                    else:
                        box['errors'].append(resp.status)
                except (OSError, httpclient.HTTPException) as err:
                    box['errors'].append(repr(err))
                    conn.close()
            conn.close()
        thread = threading.Thread(target=loop)
        thread.start()
        self.addCleanup(thread.join, 30)
        self.addCleanup(done.set)
        wait_until(lambda: box['ok'] >= 50, msg='served before restart')
        began = time.monotonic()
        code, out, err = self.brim('restart')
        self.assertEqual((code, err), (0, ''), out)
        new_pid = self.read_pid()
        self.track(new_pid)
        self.assertNotEqual(new_pid, pid)
        self.assert_gone([pid], timeout=15)
        took = time.monotonic() - began
        since = box['ok']
        wait_until(lambda: box['ok'] >= since + 50,
                   msg='served after restart')
        done.set()
        thread.join(30)
        self.assertEqual(box['errors'][:10], [])
        self.assertGreaterEqual(box['ok'], 100)
        if os.environ.get('BRIM_TEST_FIGURES'):
            sys.stderr.write('\nnginx restart: %d requests, %d failures, '
                             'old brimd gone after %.2fs\n'
                             % (box['ok'], len(box['errors']), took))


NGINX_PLAIN_SITE = '''
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://unix:%(sock)s:;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }
    }
'''

# The README's Deployment site, but on a test port and socket.
NGINX_SITE = '''
    upstream brim {
        server unix:%(sock)s;
        keepalive 8;
    }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://brim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }
    }
'''

FORWARDED_ENV_APP = '''
import json
import wsgiref.util


def application(env, start_response):
    seen = {k: env.get(k) for k in (
        'wsgi.url_scheme', 'HTTPS', 'brim.client_addr', 'HTTP_HOST',
        'REMOTE_ADDR')}
    seen['request_uri'] = wsgiref.util.request_uri(env)
    body = json.dumps(seen)
    start_response('200 OK', [('Content-Type', 'application/json'),
                              ('Content-Length', str(len(body)))])
    return [body.encode()]
'''


NGINX_CONF = '''
daemon off;
master_process off;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log;
events { worker_connections 64; }
http {
    access_log %(tmp)s/nginx-access.log;
    client_body_temp_path %(tmp)s/nginx-body;
    proxy_temp_path %(tmp)s/nginx-proxy;
    fastcgi_temp_path %(tmp)s/nginx-fastcgi;
    uwsgi_temp_path %(tmp)s/nginx-uwsgi;
    scgi_temp_path %(tmp)s/nginx-scgi;
%(site)s}
'''


# ---------------------------------------------------------------------------
# 14b. Scaling a running brimd: scale, SIGTTIN/SIGTTOU, workers = 1..N
# ---------------------------------------------------------------------------

class TestScaling(BrimTestCase):
    """Workers added and retired while brimd serves: nothing fails, nothing
    is cut off, no count is lost."""

    def scale_conf(self, workers='2'):
        self.port = free_port()
        self.write_conf("""
            [wsgi]
            ip = 127.0.0.1
            port = %d
            workers = %s
            max_workers = 6
            apps = waits echo stats

            [waits]
            call = mywait.Waits
            dir = %s

            [echo]
            call = brim.wsgi_echo.WSGIEcho

            [stats]
            call = brim.wsgi_stats.WSGIStats
            """ % (self.port, workers, self.tmp))
        return self.start()

    def holders(self):
        """The pids of the workers that took a /hold request so far."""
        try:
            with open(os.path.join(self.tmp, 'holding')) as fp:
                return [int(pid) for pid in fp.read().split()]
        except OSError:
            return []

    def hold(self, results):
        """A /hold request in a thread, its result added to ``results``."""
        def ask():
            results.append(self.http(self.port, 'GET', '/hold',
                                     timeout=30)[::2])
        thread = threading.Thread(target=ask)
        thread.start()
        self.addCleanup(thread.join, 30)
        return thread

    def release(self):
        with open(os.path.join(self.tmp, 'release'), 'w'):
            pass

    def test_scale_under_load_drains_and_loses_nothing(self):
        main = self.scale_conf()
        hammer = Hammer(self.port, fresh=2, keep_alive=2).start()
        self.addCleanup(hammer.stop)
        wait_until(lambda: hammer.served > 50, timeout=20)
        self.assertEqual(self.brim('scale', '4'),
                         (0, 'scaled [wsgi] 2 -> 4 workers\n', ''))
        # Once scale returns, the stats list the four as serving.
        stats = self.stats(self.port)
        self.assertEqual(stats['scale'], {'wsgi': {'target': 4,
                                                   'running': 4}})
        pids = {w['label']: w['pid'] for w in stats['workers']}
        self.assertEqual(sorted(pids), ['0', '1', '2', '3'])
        self.assertEqual(sorted(pids.values()),
                         sorted(live_children_of(main)))
        # Requests held in flight, until one is on a worker to retire.
        held = []
        threads = []
        while not set(self.holders()) - {pids['0']}:
            self.assertLess(len(threads), 40, self.holders())
            threads.append(self.hold(held))
            wait_until(lambda: len(self.holders()) == len(threads))
        self.assertEqual(self.brim('scale', 'wsgi', '1'),
                         (0, 'scaled [wsgi] 4 -> 1 workers\n', ''))
        status = self.brim('status')[1]
        self.assertRegex(status, r'worker [123]: pid \d+, draining, '
                                 r'[1-9]\d* in flight')
        self.assertRegex(status, r'    [2-4] of 1 workers running \(workers = '
                                 r'2, at most 6\)')
        self.release()
        for thread in threads:
            thread.join(30)
        self.assertEqual(held, [(200, b'held')] * len(threads))
        wait_until(lambda: live_children_of(main) == [pids['0']],
                   msg='the retired workers did not exit')
        hammer.stop()
        self.assertEqual(hammer.errors, [], hammer.figures())
        # Once brimd has reaped them, their buckets show them gone, and
        # every request answered is counted, the retired workers' too: the
        # /stats before the scale down, and each one here before the last.
        # (A worker counts a request just after sending its answer, so the
        # count may lag the client by a moment; it must never pass it.)
        asked = []

        def settled():
            stats = self.stats(self.port)
            expected = hammer.served + len(held) + 1 + len(asked)
            asked.append((stats['scale'], stats['wsgi']['request_count'],
                          expected))
            self.assertLessEqual(asked[-1][1], expected)
            return asked[-1] == ({'wsgi': {'target': 1, 'running': 1}},
                                 expected, expected) and stats
        stats = wait_until(settled, msg='every request counted')
        self.assertEqual([w['label'] for w in stats['workers']], ['0'])

    def scaled_to(self, main, count):
        """True once brimd runs ``count`` workers and says so."""
        return (len(live_children_of(main)) == count and
                self.stats(self.port)['scale']['wsgi'] ==
                {'target': count, 'running': count})

    def test_signals_and_restart_in_place_keep_the_count(self):
        main = self.scale_conf(workers='1')
        for count in (2, 3):
            os.kill(main, signal.SIGTTIN)
            wait_until(lambda: self.scaled_to(main, count),
                       msg='SIGTTIN did not add a worker')
        before = set(live_children_of(main))
        os.kill(main, signal.SIGUSR2)       # restart in place
        wait_until(lambda: brim._ping(main) == 1 and self.scaled_to(main, 3)
                   and not before & set(live_children_of(main)),
                   timeout=20, msg='the restart did not keep 3 workers')
        os.kill(main, signal.SIGTTOU)
        wait_until(lambda: self.scaled_to(main, 2),
                   msg='SIGTTOU did not retire a worker')
        log = self.log_text()
        self.assertIn('SIGTTIN: scaled [wsgi] 2 -> 3 workers', log)
        self.assertIn('SIGTTOU: scaled [wsgi] 3 -> 2 workers', log)
        for args, line in (
                (('wsgi', '7'), 'refused: [wsgi] may run 1 to 6 workers '
                                '(max_workers), not 7'),
                (('nope', '2'), 'refused: no section [nope]; scale one '
                                'of: wsgi'),
                (('many',), "refused: 'many' is not a worker count; give "
                            "N, +N or -N")):
            self.assertEqual(self.brim('scale', *args), (1, '', line + '\n'))
        self.assertTrue(self.scaled_to(main, 2))
        self.stop()
        code, out, err = self.brim('scale', '2')
        self.assertEqual((code, out, err), (1, '', 'not running\n'))

    def test_workers_range_adds_a_worker_while_all_are_busy(self):
        main = self.scale_conf(workers='1..2')
        self.assertEqual(len(live_children_of(main)), 1)
        results = []
        threads = [self.hold(results) for _ in range(2)]
        wait_until(lambda: self.scaled_to(main, 2), timeout=15,
                   msg='brimd did not add a worker')
        self.assertIn('[wsgi] every worker busy for 3s: 2 workers (1..2)',
                      self.log_text())
        self.assertIn('    2 of 2 workers running (workers = 1..2, at most '
                      '6); latest: '
                      'every worker busy for 3s', self.brim('status')[1])
        self.assertEqual(self.brim('scale', 'wsgi', '1')[2],
                         'refused: [wsgi] workers = 1..2 scales itself; '
                         'give it a fixed count to scale it by hand\n')
        self.release()
        for thread in threads:
            thread.join(30)
        self.assertEqual(results, [(200, b'held')] * 2)


# ---------------------------------------------------------------------------
# 15. TLS: certfile and keyfile
# ---------------------------------------------------------------------------

class TestTLS(EchoTestCase):
    """certfile/keyfile make a WSGI subserver speak HTTPS and a TCP one hand
    TLS sockets to its handler; bad files stop the start."""

    def setUp(self):
        EchoTestCase.setUp(self)
        cert, key = self_signed()
        self.cert = self.write_file('cert.pem', cert)
        self.key = self.write_file('key.pem', key)
        self.context = ssl.create_default_context(cafile=self.cert)

    def write_file(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, 'w') as fp:
            fp.write(text)
        return path

    def tls_conf(self, certfile, keyfile=None, extra=''):
        lines = 'certfile = %s\n' % certfile
        if keyfile:
            lines += 'keyfile = %s\n' % keyfile
        self.echo_conf(wsgi_extra=lines + extra)

    def https(self, method, path, body=b''):
        client = HTTPClient(self.port, context=self.context)
        try:
            return client.request(method, path, body)
        finally:
            client.close()

    def test_clients_that_reset_before_the_handshake(self):
        # ssl reads from a socket it wraps when the peer looks gone; a
        # reset there must cost that connection only.
        self.tls_conf(self.cert, self.key, extra='client_timeout = 2\n')
        self.start()
        for n in range(20):
            client = socket.create_connection(('127.0.0.1', self.port))
            if n % 2:
                client.sendall(b'hello')
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                              b'\1\0\0\0\0\0\0\0')    # reset on close
            client.close()
        response = self.https('POST', '/echo', b'after resets')
        self.assertEqual((response.status, response.body),
                         (200, b'after resets'))

    def test_proxy_header_before_the_handshake(self):
        self.tls_conf(self.cert, self.key, extra='proxy_protocol = yes\n')
        self.start()
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(PROXY_HEADERS[0][0])
        tls = self.context.wrap_socket(sock, server_hostname='localhost')
        self.addCleanup(tls.close)
        tls.sendall(b'GET /peer HTTP/1.0\r\n\r\n')
        answer = read_until_closed(tls)
        seen = json.loads(answer.partition(b'\r\n\r\n')[2])
        self.assertEqual((seen['REMOTE_ADDR'], seen['wsgi.url_scheme']),
                         ('192.0.2.1', 'https'))

    def test_https(self):
        self.tls_conf(self.cert, self.key, extra='client_timeout = 2\n')
        self.start()
        response = self.https('POST', '/echo', b'over tls')
        self.assertEqual((response.status, response.body), (200, b'over tls'))
        self.assertEqual(self.https('GET', '/scheme').body, b'https on')
        try:
            plain = self.raw(self.port, b'GET /here HTTP/1.1\r\nHost: x\r\n'
                             b'Connection: close\r\n\r\n')
        except socket.timeout:
            plain = b''
        self.assertFalse(plain.startswith(b'HTTP/1.1 200'), plain)
        # Clients that never finish a handshake hold no one up, and are
        # dropped after client_timeout.
        idle = socket.create_connection(('127.0.0.1', self.port), timeout=6)
        self.addCleanup(idle.close)
        garbage = socket.create_connection(('127.0.0.1', self.port),
                                           timeout=6)
        self.addCleanup(garbage.close)
        garbage.sendall(b'\x16\x03\x01\x00\x10' + b'not a client hello')
        began = time.monotonic()
        response = self.https('POST', '/echo', b'still here')
        self.assertEqual((response.status, response.body),
                         (200, b'still here'))
        self.assertLess(time.monotonic() - began, 1.0)
        for sock in (idle, garbage):
            try:
                self.assertFalse(sock.recv(65536).startswith(b'HTTP/'))
            except ConnectionResetError:
                pass
        self.assertLess(time.monotonic() - began, 4.0,
                        'a silent TLS client outlived client_timeout')

    def test_certfile_holding_the_key(self):
        both = self.write_file('both.pem', ''.join(reversed(self_signed())))
        self.tls_conf(both)
        self.start()
        response = self.https('POST', '/echo', b'one file')
        self.assertEqual((response.status, response.body), (200, b'one file'))

    def test_tls_tcp_handler(self):
        port = free_port()
        self.write_conf('''
            [brim]
            certfile = %s
            keyfile = %s

            [tcp]
            ip = 127.0.0.1
            port = %d
            call = brim.tcp_echo.TCPEcho
            ''' % (self.cert, self.key, port))
        self.start()
        with self.context.wrap_socket(
                socket.create_connection(('127.0.0.1', port), timeout=5),
                server_hostname='localhost') as sock:
            sock.sendall(b'echo over tls')
            data = b''
            while len(data) < 13:
                chunk = sock.recv(100)
                if not chunk:
                    break
                data += chunk
        self.assertEqual(data, b'echo over tls')
        try:
            plain = tcp_exchange(port, b'plain text')
        except OSError:
            # The failed handshake may reset the connection before the
            # client's half-close (ENOTCONN) or its read (ECONNRESET).
            plain = b''
        self.assertNotEqual(plain, b'plain text')

    def test_bad_tls_files_fail_start(self):
        other_key = self.write_file('other-key.pem', self_signed(1)[1])
        garbage = self.write_file('garbage.pem', 'not a key\n')
        cases = [
            ('missing certfile', os.path.join(self.tmp, 'missing.pem'),
             self.key, 'certfile'),
            ('garbage keyfile', self.cert, garbage, 'keyfile'),
            ('keyfile of another cert', self.cert, other_key,
             'certfile|keyfile'),
            ('certfile without a key and no keyfile', self.cert, None,
             'certfile|keyfile'),
        ]
        for case, certfile, keyfile, option in cases:
            with self.subTest(case=case):
                self.tls_conf(certfile, keyfile)
                self.assert_start_refused(self.port, r'\[wsgi\]', option)


if __name__ == '__main__':
    unittest.main()
