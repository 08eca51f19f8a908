//! The fault proxy in front of moto: counts EC2 calls per Action,
//! injects faults, and plays [`Model`] (see `super`).

use super::model::run_instances_model;
use super::*;

/// A fault for requests of one EC2 Action (optionally only those whose form
/// body has `param=value`; param `*`: any parameter has that value, e.g. an
/// instance id at any position of a list).
#[derive(Debug, Clone)]
pub struct Fault {
    pub action: String,
    pub when: Option<(String, String)>,
    pub code: String,
    pub status: u16,
    /// How many more times; `None`: always.
    pub times: Option<u32>,
    /// The error's message (EC2 names the ids it refers to); `None`: a
    /// generic one.
    pub message: Option<String>,
}

/// One call seen: (when, Action, whether a fault was injected, form parameters).
type Call = (Instant, String, bool, Vec<(String, String)>);

#[derive(Default)]
pub(super) struct ProxyState {
    pub(super) calls: Vec<Call>,
    pub(super) faults: Vec<Fault>,
    pub(super) model: Model,
    /// Instances launched through the proxy: id -> (when, type).
    pub(super) launched: HashMap<String, (Instant, String)>,
    /// Images made through the proxy (CreateImage): id -> when.
    pub(super) images: HashMap<String, Instant>,
    /// Each RunInstances that launched: its UserData (base64) and the
    /// instance ids EC2 answered, in order.
    pub(super) run_answers: Vec<(String, Vec<String>)>,
    /// What moto said once and never changes: subnet -> zone, and type ->
    /// the zones that offer it (asking moto each launch costs seconds).
    pub(super) subnet_zones: HashMap<String, String>,
    pub(super) offered: HashMap<String, Vec<String>>,
}

/// Counts EC2 calls per Action and injects faults, in front of moto.
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

impl FaultProxy {
    /// In front of this test process's moto.
    pub fn start(rt: &tokio::runtime::Runtime) -> FaultProxy {
        Self::start_for(rt, moto())
    }

    /// In front of the moto server at `upstream`.
    pub fn start_for(rt: &tokio::runtime::Runtime, upstream: &str) -> FaultProxy {
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let client: HttpClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let shared =
            Shared { state: state.clone(), client, run_lock: Arc::default(), upstream: upstream.to_string() };
        let app = axum::Router::new().fallback(any(proxy)).with_state(shared);
        let task = rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { url, state, task }
    }

    pub fn add_fault(&self, f: Fault) {
        self.state.lock().unwrap().faults.push(f);
    }

    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Sets how EC2 behaves from now on (see [`Model`]).
    pub fn set_model(&self, m: Model) {
        self.state.lock().unwrap().model = m;
    }

    /// Changes the model in place (e.g. raises the quota).
    pub fn with_model(&self, f: impl FnOnce(&mut Model)) {
        f(&mut self.state.lock().unwrap().model);
    }

    /// Calls per Action so far.
    pub fn counts(&self) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        for (_, a, _, _) in &self.state.lock().unwrap().calls {
            *m.entry(a.clone()).or_insert(0) += 1;
        }
        m
    }

    pub fn count(&self, action: &str) -> u32 {
        self.counts().get(action).copied().unwrap_or(0)
    }

    /// The launches answered so far, from the `from`th on: each one's
    /// userdata (decoded) and instance ids.
    pub fn launches(&self, from: usize) -> Vec<(String, Vec<String>)> {
        let st = self.state.lock().unwrap();
        st.run_answers
            .iter()
            .skip(from)
            .map(|(ud, ids)| {
                let text = base64::engine::general_purpose::STANDARD.decode(ud).unwrap_or_default();
                (String::from_utf8_lossy(&text).into_owned(), ids.clone())
            })
            .collect()
    }

    /// Times of the calls of one Action.
    pub fn times(&self, action: &str) -> Vec<Instant> {
        self.state.lock().unwrap().calls.iter().filter(|(_, a, _, _)| a == action).map(|(t, ..)| *t).collect()
    }

    /// The form parameters of every call of one Action, and whether the
    /// call was answered with an injected fault.
    pub fn requests(&self, action: &str) -> Vec<(bool, HashMap<String, String>)> {
        let st = self.state.lock().unwrap();
        st.calls
            .iter()
            .filter(|(_, a, _, _)| a == action)
            .map(|(_, _, faulted, p)| (*faulted, p.iter().cloned().collect()))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<ProxyState>>,
    client: HttpClient,
    /// RunInstances calls are answered one at a time (capacity and quota
    /// are checked and taken together).
    run_lock: Arc<tokio::sync::Mutex<()>>,
    /// The moto server behind.
    upstream: String,
}

/// An EC2 error answer.
pub(super) struct Refusal {
    pub(super) code: String,
    pub(super) status: u16,
    pub(super) message: String,
}

fn error_response(code: &str, status: u16, message: &str) -> Response {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors>\
         <RequestID>fault-proxy</RequestID></Response>"
    );
    Response::builder().status(status).header("content-type", "text/xml").body(Body::from(xml)).unwrap()
}

async fn proxy(State(sh): State<Shared>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let mut body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let params: Vec<(String, String)> =
        form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(op) = target.strip_prefix("AWSPriceListService.") {
        return price_list(&sh.state, op, &body);
    }
    let action = params.iter().find(|(k, _)| k == "Action").map(|(_, v)| v.clone()).unwrap_or_default();
    let fault = {
        let mut st = sh.state.lock().unwrap();
        let hit = st.faults.iter_mut().find(|f| {
            f.action == action
                && f.times != Some(0)
                && f.when
                    .as_ref()
                    .is_none_or(|(k, v)| params.iter().any(|(pk, pv)| (k == "*" || pk == k) && pv == v))
        });
        hit.map(|f| {
            if let Some(t) = f.times.as_mut() {
                *t -= 1;
            }
            f.clone()
        })
    };
    let record = |faulted: bool| {
        sh.state.lock().unwrap().calls.push((Instant::now(), action.clone(), faulted, params.clone()));
    };
    if let Some(f) = fault {
        record(true);
        let msg = f.message.as_deref().unwrap_or("injected by the test fault proxy");
        return error_response(&f.code, f.status, msg);
    }
    if action == "TerminateInstances" || action == "DescribeInstances" {
        // The latency in force now (lowering it releases waiting calls).
        let start = Instant::now();
        let latency = |m: &Model| {
            if action == "TerminateInstances" { m.terminate_latency } else { m.describe_latency }
        };
        while start.elapsed() < latency(&sh.state.lock().unwrap().model) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let model = sh.state.lock().unwrap().model.clone();
    // Held until the launch is recorded: capacity and quota are taken once.
    let _run = if action == "RunInstances" { Some(sh.run_lock.lock().await) } else { None };
    if action == "DescribeSpotPriceHistory" && !model.spot_usd.is_empty() {
        record(false);
        return spot_price_history(&model, &params);
    }
    let mut draws: Vec<String> = Vec::new();
    if action == "RunInstances" {
        // The latency in force now, not at the call: a test that lowers
        // it releases the calls waiting.
        let start = Instant::now();
        while start.elapsed() < sh.state.lock().unwrap().model.run_latency {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match run_instances_model(&sh.upstream, &sh.state, &model, &params).await {
            Err(r) => {
                record(true);
                return error_response(&r.code, r.status, &r.message);
            }
            Ok((Some(changed), keys)) => {
                let mut ser = form_urlencoded::Serializer::new(String::new());
                ser.extend_pairs(changed.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                body = Bytes::from(ser.finish());
                draws = keys;
            }
            Ok((None, keys)) => draws = keys,
        }
    }
    record(false);
    let uri = format!("{}{}", sh.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut fwd = hyper::Request::builder().method(parts.method.clone()).uri(uri);
    for (k, v) in parts.headers.iter() {
        if k != "host" && k != "content-length" {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match sh.client.request(fwd.body(Full::new(body)).unwrap()).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let (mut parts, body) = resp.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let ok = parts.status.is_success();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let out = if ok && action == "RunInstances" {
        let itype =
            params.iter().find(|(k, _)| k == "InstanceType").map(|(_, v)| v.clone()).unwrap_or_default();
        let ids = xml_values(&text, "instanceId");
        let mut st = sh.state.lock().unwrap();
        for k in &draws {
            if let Some(left) = st.model.capacity.get_mut(k) {
                *left = left.saturating_sub(ids.len() as u32);
            }
        }
        for id in &ids {
            st.launched.insert(id.clone(), (Instant::now(), itype.clone()));
        }
        let ud = params.iter().find(|(k, _)| k == "UserData").map(|(_, v)| v.clone()).unwrap_or_default();
        st.run_answers.push((ud, ids));
        bytes
    } else if ok && action == "CreateImage" {
        if let Some(id) = xml_values(&text, "imageId").into_iter().next() {
            sh.state.lock().unwrap().images.insert(id, Instant::now());
        }
        bytes
    } else if ok && action == "DescribeImages" && !model.image_pending_for.is_zero() {
        let pending: Vec<String> = {
            let st = sh.state.lock().unwrap();
            st.images
                .iter()
                .filter(|(_, t)| t.elapsed() < model.image_pending_for)
                .map(|(id, _)| id.clone())
                .collect()
        };
        parts.headers.remove("content-length");
        Bytes::from(images_pending(&text, &pending))
    } else if ok
        && action == "DescribeInstances"
        && !(model.pending_for.is_zero() && model.listing_lag.is_zero())
    {
        // Instances launched within a span of time, by this proxy.
        let within = |d: Duration| -> Vec<String> {
            let st = sh.state.lock().unwrap();
            st.launched.iter().filter(|(_, (t, _))| t.elapsed() < d).map(|(id, _)| id.clone()).collect()
        };
        let (hidden, young) = (within(model.listing_lag), within(model.pending_for));
        parts.headers.remove("content-length");
        Bytes::from(still_pending(&drop_reservations(&text, &hidden), &young))
    } else {
        bytes
    };
    Response::from_parts(parts, Body::from(out))
}

/// A DescribeImages answer where the images `pending` are still being
/// made: their state says `pending`, as EC2's does while it snapshots.
fn images_pending(xml: &str, pending: &[String]) -> String {
    let mut out = xml.to_string();
    for id in pending {
        let Some(at) = out.find(&format!("<imageId>{id}</imageId>")) else { continue };
        let (avail, pend) = ("<imageState>available</imageState>", "<imageState>pending</imageState>");
        if let Some(rel) = out[at..].find(avail) {
            out.replace_range(at + rel..at + rel + avail.len(), pend);
        }
    }
    out
}

/// A DescribeInstances answer where the instances `young` are still
/// starting: their state says `pending` (code 0), as EC2's does.
fn still_pending(xml: &str, young: &[String]) -> String {
    let mut out = xml.to_string();
    for id in young {
        let Some(at) = out.find(&format!("<instanceId>{id}</instanceId>")) else { continue };
        let Some(rel) = out[at..].find("<instanceState>") else { continue };
        let start = at + rel;
        let Some(len) = out[start..].find("</instanceState>") else { continue };
        let end = start + len + "</instanceState>".len();
        if out[start..end].contains("<name>running</name>") {
            out.replace_range(
                start..end,
                "<instanceState><code>0</code><name>pending</name></instanceState>",
            );
        }
    }
    out
}

/// The text of every `<tag>...</tag>` in `xml`.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|r| r.split(close.as_str()).next())
        .map(String::from)
        .collect()
}

/// A DescribeInstances answer without the reservations holding any of
/// `hidden` (instances launched together share one reservation).
fn drop_reservations(xml: &str, hidden: &[String]) -> String {
    let (Some(start), Some(end)) = (xml.find("<reservationSet>"), xml.find("</reservationSet>")) else {
        return xml.to_string();
    };
    let inner = &xml[start + "<reservationSet>".len()..end];
    // Split the set into its top-level <item> elements.
    let mut items = Vec::new();
    let (mut depth, mut from, mut i) = (0usize, None, 0usize);
    while i < inner.len() {
        if inner[i..].starts_with("<item>") {
            if depth == 0 {
                from = Some(i);
            }
            depth += 1;
            i += "<item>".len();
        } else if inner[i..].starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0
                && let Some(f) = from.take()
            {
                items.push(&inner[f..i]);
            }
        } else {
            i += inner[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let kept: String = items
        .into_iter()
        .filter(|item| !xml_values(item, "instanceId").iter().any(|id| hidden.contains(id)))
        .collect();
    format!("{}<reservationSet>{kept}{}", &xml[..start], &xml[end..])
}

/// `DescribeSpotPriceHistory` from the model's price table: the price in
/// force in each zone of each type asked (`InstanceType.N`), as EC2 answers
/// a query whose start time is now.
fn spot_price_history(model: &Model, params: &[(String, String)]) -> Response {
    let types: Vec<&str> =
        params.iter().filter(|(k, _)| k.starts_with("InstanceType.")).map(|(_, v)| v.as_str()).collect();
    let mut rows: Vec<(&(String, String), &f64)> =
        model.spot_usd.iter().filter(|((t, _), _)| types.is_empty() || types.contains(&t.as_str())).collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    let items: String = rows
        .into_iter()
        .map(|((t, z), p)| {
            format!(
                "<item><instanceType>{t}</instanceType><productDescription>Linux/UNIX</productDescription>\
                 <spotPrice>{p:.6}</spotPrice><timestamp>2026-12-01T00:00:00.000Z</timestamp>\
                 <availabilityZone>{z}</availabilityZone></item>"
            )
        })
        .collect();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeSpotPriceHistoryResponse \
         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>fault-proxy</requestId>\
         <spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken></nextToken>\
         </DescribeSpotPriceHistoryResponse>"
    );
    Response::builder().status(200).header("content-type", "text/xml").body(Body::from(xml)).unwrap()
}

/// The Price List API's `GetProducts` (JSON protocol), from the model's
/// price table: one product per type, in AWS's layout.
fn price_list(state: &Mutex<ProxyState>, op: &str, body: &[u8]) -> Response {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| {
        req["Filters"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["Field"] == name))
            .and_then(|f| f["Value"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let (itype, region) = (field("instanceType"), field("regionCode"));
    let mut st = state.lock().unwrap();
    st.calls.push((Instant::now(), op.to_string(), false, vec![("instanceType".into(), itype.clone())]));
    let products: Vec<String> = st
        .model
        .on_demand_usd
        .get(&itype)
        .filter(|_| op == "GetProducts")
        .map(|usd| {
            serde_json::json!({
                "product": {"attributes": {"instanceType": itype, "regionCode": region, "operatingSystem": "Linux"}},
                "terms": {"OnDemand": {"SKU.JRTCKXETXF": {"priceDimensions": {"SKU.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": "Hrs", "pricePerUnit": {"USD": format!("{usd:.10}")}
                }}}}}
            })
            .to_string()
        })
        .into_iter()
        .collect();
    let body = serde_json::json!({"FormatVersion": "aws_v1", "PriceList": products}).to_string();
    Response::builder()
        .status(200)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Body::from(body))
        .unwrap()
}
