//! The dashboard in a real headless Chromium (Debian's `chromium`, which
//! `.ci/run` and `scripts/test` install): the browser signs in once with the
//! token (a form POST: never in a URL) and keeps a session cookie; the page
//! shows the nodes of a running local cluster and, without reloading,
//! reflects a killed slave.

use ddisco_tests::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "dash-token-0123456789abcdef";

/// The DOM after the page's scripts ran (virtual time: 4 s of timers).
fn dump_dom(url: &str) -> String {
    dump_dom_in(url, &tempfile::tempdir().unwrap())
}

/// The same, with a browser profile (cookies) kept in `profile`.
fn dump_dom_in(url: &str, profile: &tempfile::TempDir) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is not installed: apt-get install chromium (scripts/test does it)");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dashboard_shows_the_nodes_and_reflects_a_killed_slave() {
    let mut c = Cluster::start(&format!("num_slaves = 2\ndashboard_token = \"{TOKEN}\""));
    let s = c.wait_until("2 slaves ready", Duration::from_secs(60), |s| at_size(s, 2));
    let addr = std::fs::read_to_string(c.state_dir().join("dashboard.addr")).unwrap();
    let url = format!("http://{}/", addr.trim());

    // Without signing in: the sign-in form. A token in the URL (which
    // would land in history and proxy logs) is not taken either.
    let dom = dump_dom(&url);
    assert!(dom.contains("dashboard token required") && dom.contains("<form"), "{dom}");
    let dom = dump_dom(&format!("{url}?token={TOKEN}"));
    assert!(dom.contains("dashboard token required"), "a token in the URL was taken:\n{dom}");
    let (code, _) = c.dashboard_get(&format!("/api/status?token={TOKEN}"), None);
    assert_eq!(code, 401);

    // The browser signs in once (the form POSTs the token in its body) and
    // keeps the session cookie in its profile.
    let profile = tempfile::tempdir().unwrap();
    let signin = profile.path().join("signin.html");
    std::fs::write(
        &signin,
        format!(
            "<form method=post action='{url}login'><input name=token value='{TOKEN}'></form>\
             <script>document.forms[0].submit()</script>"
        ),
    )
    .unwrap();
    let dom = dump_dom_in(&format!("file://{}", signin.display()), &profile);
    for n in nodes(&s) {
        let id = n["node_id"].as_str().unwrap();
        assert!(dom.contains(&format!("id=\"node-{id}\"")), "{id} not shown:\n{dom}");
    }
    assert!(dom.contains("2/2 slaves ready"), "{dom}");
    assert!(dom.contains("id=\"updated\">updated "), "the page did not refresh from the API:\n{dom}");

    // Kill a slave: the page shows it gone, its replacement, and the event.
    let victim = node_ids(&s, "slave")[0].clone();
    let pid = c.node_pid(&victim);
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    let s = c.wait_until("the slave is replaced", Duration::from_secs(60), |s| {
        at_size(s, 2) && !node_ids(s, "slave").contains(&victim)
    });
    // Later visits need no token: the cookie signs them in.
    let dom = dump_dom_in(&url, &profile);
    assert!(!dom.contains(&format!("id=\"node-{victim}\"")), "{victim} still shown:\n{dom}");
    for id in node_ids(&s, "slave") {
        assert!(dom.contains(&format!("id=\"node-{id}\"")), "replacement {id} not shown:\n{dom}");
    }
    assert!(dom.contains(&format!("{victim} lost")), "no loss event:\n{dom}");
    // Issue 16, item 5: the charts, drawn by uPlot (served by the
    // controller) from the history it keeps: each chart's legend names its
    // series, and the nodes chart has the loss marked.
    assert_eq!(dom.matches("class=\"uplot").count(), 4, "four charts expected:\n{dom}");
    for label in
        ["desired", "ready", "failed", "lost", "cost $/h", "spent $", "engine target", "enrolled", "running"]
    {
        assert!(dom.contains(&format!(">{label}<")), "no series {label:?} in the charts:\n{dom}");
    }
    // The history has the loss once a sample is taken after it (one a
    // second at most, each tick): waited for, with a deadline.
    let end = Instant::now() + Duration::from_secs(20);
    let (samples, body) = loop {
        let (code, body) = c.dashboard_get("/api/history", Some(TOKEN));
        assert_eq!(code, 200, "{body}");
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        let samples = h["samples"].as_array().unwrap().clone();
        if samples.last().is_some_and(|x| x["losses"].as_u64().unwrap_or(0) >= 1) {
            break (samples, body);
        }
        assert!(Instant::now() < end, "the loss is not in the history: {body}\n{}", c.serve_log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(samples.len() >= 3, "{body}");
    assert!(samples.iter().any(|x| x["ready"] == 3), "{body}");
    let (code, _) = c.dashboard_get("/api/history", None);
    assert_eq!(code, 401, "the history needs the token too");
    assert!(!dom.contains(TOKEN), "the token is rendered in the page");
}

/// One raw HTTP/1.1 exchange with the dashboard: `request` sent as is; the
/// answer's status code and head.
fn raw(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, resp)
}

/// Issue 26, item 5: what a peer may hold of the dashboard's port. A page
/// of another name (DNS rebinding to 127.0.0.1) is refused; wrong tokens
/// make their address wait; a client trickling its request head is cut
/// off at the header deadline; connections beyond the cap are closed at
/// once, and the port serves again once the idle ones are gone.
#[test]
fn the_dashboard_bounds_what_a_peer_may_hold() {
    use std::io::{Read, Write};
    let mut c = Cluster::start(&format!("num_slaves = 0\ndashboard_token = \"{TOKEN}\""));
    c.wait_until("the master ready", Duration::from_secs(120), |s| at_size(s, 0));
    let addr = std::fs::read_to_string(c.state_dir().join("dashboard.addr")).unwrap().trim().to_string();

    // DNS rebinding: the browser sends the attacker's name.
    let (code, resp) =
        raw(&addr, "GET /healthz HTTP/1.1\r\nHost: evil.example:7445\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 421, "{resp}");
    let (code, _) = raw(&addr, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 200);

    // Guessing the token: the second wrong try waits.
    let login = |token: &str| {
        let body = format!("token={token}");
        raw(
            &addr,
            &format!(
                "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    assert_eq!(login("wrong-guess-1").0, 401);
    let (code, resp) = login("wrong-guess-2");
    assert_eq!(code, 429, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after"), "{resp}");

    // A client that trickles its request head, a line a second.
    let t0 = Instant::now();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let mut cut = None;
    for i in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        if slow.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).is_err() {
            cut = Some(t0.elapsed());
            break;
        }
        slow.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 64];
        if slow.read(&mut b).is_ok() {
            cut = Some(t0.elapsed());
            break;
        }
    }
    let cut = cut.expect("the trickling client was never cut off");
    assert!(cut < Duration::from_secs(14), "cut off after {cut:?}");

    // Idle connections beyond the cap are closed at once.
    let idle: Vec<std::net::TcpStream> =
        (0..80).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = idle
        .iter()
        .filter(|s| {
            let mut s = *s;
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut b = [0u8; 8];
            match s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            }
        })
        .count();
    assert!(closed >= 16, "{closed} of 80 idle connections closed at once (cap 64)");
    // They go at the header deadline; the port then serves again.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _) = raw(&addr, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < end, "the dashboard never served again");
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(idle);
}

/// Issue 26, item 5: bound beyond loopback, the dashboard speaks HTTPS
/// only, with the controller's certificate (the session CA's, as
/// `<state_dir>/ca.pem`): the token never crosses the network in clear.
/// Plain HTTP gets no answer; HTTPS verified against the CA serves
/// `/metrics` with the token and refuses it without; a peer that never
/// starts its handshake is cut off at the head's deadline.
#[test]
fn beyond_loopback_the_dashboard_speaks_https_only() {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    use std::io::{Read, Write};
    let c = Cluster::start(&format!(
        "num_slaves = 0\ndashboard_listen = \"0.0.0.0:0\"\ndashboard_token = \"{TOKEN}\""
    ));
    let bound = std::fs::read_to_string(c.state_dir().join("dashboard.addr")).unwrap();
    let port = bound.trim().rsplit(':').next().unwrap().to_string();
    let addr = format!("127.0.0.1:{port}");

    let (code, resp) = raw(&addr, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 0, "plain HTTP was answered: {resp}");

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read_to_string(c.state_dir().join("ca.pem")).unwrap();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let https = |request: String| -> (u16, String) {
        let tcp = std::net::TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn =
            rustls::ClientConnection::new(cfg.clone(), "ddisco-controller".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request.as_bytes()).unwrap();
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        (resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), resp)
    };
    let (code, resp) = https(format!(
        "GET /metrics HTTP/1.1\r\nHost: 10.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(code, 200, "{resp}");
    assert!(resp.contains("ddisco_"), "{resp}");
    let (code, _) =
        https(format!("GET /metrics HTTP/1.1\r\nHost: 10.0.0.1:{port}\r\nConnection: close\r\n\r\n"));
    assert_eq!(code, 401, "served without the token");

    // A peer that connects and never starts its handshake.
    let t0 = Instant::now();
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 8];
    let r = silent.read(&mut b);
    assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(14), "held {:?}", t0.elapsed());
}
