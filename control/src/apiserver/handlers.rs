//! Request routing and the REST verbs: get, list, create, update, patch, delete, subresources.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};

use super::admission;
use super::auth::{Attributes, Decision, Identity, authorize};
use super::discovery;
use super::managed_fields;
use super::patch;
use super::resources::{self, Resource, Sub};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{ApiError, Cause};
use super::table;
use super::watch;
use crate::bench::phases::mark;
use crate::storage::{Guard, Revision, Store, StoreError, TxnOp, Versioned};

/// Shared state of every request.
pub(crate) struct App<S> {
    pub store: S,
    /// Address advertised in legacy discovery.
    pub server_address: String,
    /// Background tasks: the watch-cache feeders (watches themselves are response bodies).
    pub tasks: tokio_util::task::TaskTracker,
    /// Shared watch caches, one store watch per resource type.
    pub watch_cache: Arc<super::watch_cache::WatchCache<S>>,
    /// Namespaces, LimitRanges and ResourceQuotas as admission reads them.
    pub admission_cache: super::admission_cache::AdmissionCache,
    /// Single-key writes (creates, binds, updates and status writes, graceful-deletion marks)
    /// coalesced into shared store transactions.
    pub writes: Arc<super::write_batch::WriteBatcher<S>>,
}

/// A cached namespace object, shared rather than copied (admission reads it on every create).
pub(crate) struct NamespaceRef(Arc<Vec<(Value, i64)>>);

impl std::ops::Deref for NamespaceRef {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.0.first().map_or(&Value::Null, |(o, _)| o)
    }
}

impl<S: Store> App<S> {
    /// A namespace object, from the admission cache or the store (misses are not cached).
    pub(crate) async fn namespace(&self, name: &str) -> Result<Option<NamespaceRef>> {
        let key = format!("namespaces//{name}");
        if let Some(v) = self.admission_cache.get(&key)
            && !v.is_empty()
        {
            return Ok(Some(NamespaceRef(v)));
        }
        let nsres = resources::find("", "v1", "namespaces")
            .ok_or_else(|| ApiError::internal("namespaces not registered"))?;
        match self.store.get(&nsres.key(None, name)).await? {
            Some(kv) => {
                let o = decode(nsres, &kv)?;
                let v = Arc::new(vec![(o, kv.mod_revision)]);
                self.admission_cache.put(key, v.clone());
                Ok(Some(NamespaceRef(v)))
            }
            None => Ok(None),
        }
    }
}

/// Who a write's fields are recorded for in `metadata.managedFields`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Owner<'a> {
    /// A create/update/patch by this field manager (operation `Update`).
    Update(&'a str),
    /// Server-side apply already computed the object's `managedFields`.
    Prepared,
}

/// The field manager of a request: `?fieldManager=`, else the User-Agent's product name, as
/// Kubernetes derives it.
fn field_manager(query: &Query, user_agent: &str) -> String {
    match query.get("fieldManager") {
        Some(m) => m.to_string(),
        None => user_agent
            .split('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect(),
    }
}

/// Parsed query string (last value wins).
#[derive(Debug, Default)]
pub(crate) struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub(crate) fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub(crate) fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

type Result<T> = std::result::Result<T, ApiError>;

fn json_response(code: StatusCode, v: &Value) -> Response {
    let mut r = (code, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    // Version 4 / variant bits are cosmetic here; uniqueness comes from the 122 random bits.
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn random_suffix() -> String {
    // The alphabet Kubernetes uses for generateName (no vowels, no confusable characters).
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHA[rand::random_range(0..ALPHA.len())] as char)
        .collect()
}

/// Decodes a stored value and fills in `metadata.resourceVersion`, `kind`, `apiVersion`.
pub(crate) fn decode(res: &Resource, kv: &Versioned) -> Result<Value> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is corrupt: {e}", kv.key)))?;
    if let Value::Object(m) = &mut v {
        m.insert("kind".into(), json!(res.kind));
        m.insert("apiVersion".into(), json!(res.api_version()));
        let meta = m.entry("metadata").or_insert_with(|| json!({}));
        meta["resourceVersion"] = json!(kv.mod_revision.to_string());
    }
    Ok(v)
}

/// Stored form: `apiVersion`, `kind`, `metadata` (without resourceVersion) first, then the
/// rest; [`splice_rv`] relies on this order.
pub(crate) fn encode(obj: &Value) -> Bytes {
    let mut o = obj.clone();
    let Value::Object(m) = &mut o else {
        return Bytes::from(o.to_string());
    };
    let mut meta = m.remove("metadata").unwrap_or_else(|| json!({}));
    if let Value::Object(mm) = &mut meta {
        mm.remove("resourceVersion");
    }
    let api_version = m.remove("apiVersion").unwrap_or(Value::Null);
    let kind = m.remove("kind").unwrap_or(Value::Null);
    let mut out = format!("{{\"apiVersion\":{api_version},\"kind\":{kind},\"metadata\":{meta}");
    for (k, v) in m.iter() {
        out.push(',');
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    Bytes::from(out)
}

fn with_rv(mut obj: Value, rev: Revision) -> Value {
    obj["metadata"]["resourceVersion"] = json!(rev.to_string());
    obj
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Where a request points.
#[derive(Debug)]
struct Target {
    res: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<Sub>,
    /// Legacy `/watch/` path prefix.
    watch_prefix: bool,
}

enum Route {
    Discovery(Value, bool),
    Target(Target),
    SelfSubjectAccessReview,
    Raw(Response),
}

fn route(path: &str, accept: &str, app_addr: &str) -> Result<Route> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let aggregated = accept.contains("as=APIGroupDiscoveryList");
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        ["api"] => {
            return Ok(if aggregated {
                Route::Discovery(discovery::aggregated(true), true)
            } else {
                Route::Discovery(discovery::api_versions(app_addr), false)
            });
        }
        ["apis"] => {
            return Ok(if aggregated {
                Route::Discovery(discovery::aggregated(false), true)
            } else {
                Route::Discovery(discovery::api_group_list(), false)
            });
        }
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g] => {
            let list = discovery::api_group_list();
            let found = list["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["name"] == *g).cloned())
                .ok_or_else(ApiError::not_found_path)?;
            let mut found = found;
            found["kind"] = json!("APIGroup");
            found["apiVersion"] = json!("v1");
            return Ok(Route::Discovery(found, false));
        }
        ["apis", g, v, rest @ ..] => {
            if *g == discovery::AUTHZ_GROUP && *v == "v1" {
                if rest.is_empty() {
                    return discovery::api_resource_list(g)
                        .map(|l| Route::Discovery(l, false))
                        .ok_or_else(ApiError::not_found_path);
                }
                if rest == ["selfsubjectaccessreviews"] {
                    return Ok(Route::SelfSubjectAccessReview);
                }
                return Err(ApiError::not_found_path());
            }
            if !resources::group_version_known(g, v) {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!(
                        "the server could not find the requested resource: unknown group version {g}/{v}; served: {}",
                        resources::known_group_versions()
                    ),
                ));
            }
            (*g, rest)
        }
        ["api", v, ..] => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource: unknown version {v}; served: {}",
                    resources::known_group_versions()
                ),
            ));
        }
        _ => return Ok(Route::Raw(ApiError::not_found_path().into_response())),
    };
    if rest.is_empty() {
        return discovery::api_resource_list(group)
            .map(|l| Route::Discovery(l, false))
            .ok_or_else(ApiError::not_found_path);
    }
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let unknown = |plural: &str| {
        let known: Vec<&str> = resources::RESOURCES
            .iter()
            .filter(|r| r.group == group)
            .map(|r| r.plural)
            .collect();
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource: unknown resource {plural:?}; known: {}",
                known.join(", ")
            ),
        )
    };
    let find = |plural: &str| resources::find(group, "v1", plural).ok_or_else(|| unknown(plural));
    let sub = |s: &str, res: &Resource| {
        Sub::parse(s)
            .filter(|s| res.has(*s))
            .ok_or_else(ApiError::not_found_path)
    };
    let t = match rest {
        ["namespaces", ns, plural] if resources::find(group, "v1", plural).is_some() => Target {
            res: find(plural)?,
            namespace: Some(ns.to_string()),
            name: None,
            sub: None,
            watch_prefix,
        },
        ["namespaces", _, plural] if Sub::parse(plural).is_none() => return Err(unknown(plural)),
        ["namespaces", ns, plural, name] => {
            let res = find(plural)?;
            Target {
                res,
                namespace: Some(ns.to_string()),
                name: Some(name.to_string()),
                sub: None,
                watch_prefix,
            }
        }
        ["namespaces", ns, plural, name, s] => {
            let res = find(plural)?;
            Target {
                res,
                namespace: Some(ns.to_string()),
                name: Some(name.to_string()),
                sub: Some(sub(s, res)?),
                watch_prefix,
            }
        }
        [plural] => Target {
            res: find(plural)?,
            namespace: None,
            name: None,
            sub: None,
            watch_prefix,
        },
        [plural, name] => Target {
            res: find(plural)?,
            namespace: None,
            name: Some(name.to_string()),
            sub: None,
            watch_prefix,
        },
        [plural, name, s] => {
            let res = find(plural)?;
            Target {
                res,
                namespace: None,
                name: Some(name.to_string()),
                sub: Some(sub(s, res)?),
                watch_prefix,
            }
        }
        _ => return Err(ApiError::not_found_path()),
    };
    if t.res.namespaced && t.name.is_some() && t.namespace.is_none() {
        // `GET /api/v1/pods/x` is not a valid path: namespaced items need their namespace.
        return Err(ApiError::not_found_path());
    }
    Ok(Route::Target(t))
}

/// The catch-all handler.
pub(crate) async fn dispatch<S: Store>(State(app): State<Arc<App<S>>>, req: Request) -> Response {
    let answer = async move {
        match dispatch_inner(app, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    };
    if crate::bench::phases::enabled() {
        crate::bench::phases::traced(answer).await
    } else {
        answer.await
    }
}

async fn dispatch_inner<S: Store>(app: Arc<App<S>>, req: Request) -> Result<Response> {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(ApiError::unauthorized)?;
    let manager = field_manager(
        &query,
        req.headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    match path.as_str() {
        "/healthz" | "/livez" => return Ok((StatusCode::OK, "ok").into_response()),
        "/readyz" => {
            return Ok(if app.store.ready().await {
                (StatusCode::OK, "ok").into_response()
            } else {
                let mut e = ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "[-]etcd failed: storage is not ready",
                );
                e.retry_after = Some(1);
                e.into_response()
            });
        }
        "/version" => return Ok(json_response(StatusCode::OK, &discovery::version())),
        "/openapi/v3" => return Ok(json_response(StatusCode::OK, &discovery::openapi_index())),
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/openapi/v3/") {
        return discovery::openapi_doc(gv)
            .map(|d| json_response(StatusCode::OK, &d))
            .ok_or_else(ApiError::not_found_path);
    }
    let route = route(&path, &accept, &app.server_address)?;
    let t = match route {
        Route::Raw(r) => return Ok(r),
        Route::Discovery(v, aggregated) => {
            if req.method() != Method::GET {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ));
            }
            let mut r = json_response(StatusCode::OK, &v);
            if aggregated {
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
                );
            }
            return Ok(r);
        }
        Route::SelfSubjectAccessReview => {
            let protobuf = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
                v.as_bytes()
                    .starts_with(b"application/vnd.kubernetes.protobuf")
            });
            let body = read_body(req).await?;
            let review = if protobuf {
                super::protobuf::decode_object(&body).map_err(ApiError::bad_request)?
            } else {
                parse_body(&body, "application/json")?
            };
            return self_subject_access_review(&id, review);
        }
        Route::Target(t) => t,
    };
    let method = req.method().clone();
    let table = accept.contains("as=Table") && accept.contains("g=meta.k8s.io");
    let watching = t.watch_prefix || query.flag("watch");
    let verb: &'static str = match (&method, t.name.is_some(), t.sub) {
        (&Method::GET, false, _) if watching => "watch",
        (&Method::GET, false, _) => "list",
        (&Method::GET, true, _) if watching => "watch",
        (&Method::GET, true, _) => "get",
        (&Method::POST, _, Some(_)) => "create",
        (&Method::POST, false, None) => "create",
        (&Method::PUT, true, _) => "update",
        (&Method::PATCH, true, _) => "patch",
        (&Method::DELETE, true, _) => "delete",
        (&Method::DELETE, false, _) => "deletecollection",
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    let field_sel = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), t.res.plural)
        .map_err(ApiError::bad_request)?;
    let attrs = Attributes {
        verb,
        group: t.res.group,
        resource: t.res.plural,
        subresource: t.sub.map(Sub::name),
        namespace: t.namespace.as_deref(),
        name: t.name.as_deref(),
        field_node_name: field_sel.exact("spec.nodeName"),
        field_name: field_sel.exact("metadata.name"),
    };
    let decision = authorize(&id, &attrs);
    let forbidden = || {
        ApiError::forbidden(
            &id.user(),
            verb,
            t.res.group,
            t.res.plural,
            t.namespace.as_deref(),
        )
    };
    let created_name_check = match &decision {
        Decision::Deny => return Err(forbidden()),
        Decision::PodBoundTo(node) => {
            let (ns, name) = (
                t.namespace.as_deref(),
                t.name.as_deref().unwrap_or_default(),
            );
            let bound = match app.store.get(&t.res.key(ns, name)).await? {
                Some(kv) => {
                    decode(t.res, &kv)?
                        .pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        == Some(node.as_str())
                }
                None => false,
            };
            if !bound {
                return Err(forbidden());
            }
            None
        }
        Decision::ReferencedByPodOn(node) => {
            let ns = t.namespace.as_deref().unwrap_or_default();
            let name = t.name.as_deref().unwrap_or_default();
            if !referenced_by_pod_on(&app, node, ns, t.res.plural, name).await? {
                return Err(forbidden());
            }
            None
        }
        Decision::CreatedNameIs(n) => Some(n.clone()),
        Decision::Allow => None,
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    if content_type.starts_with("application/cbor") {
        // 415 makes client-go fall back to JSON.
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {content_type:?})"
            ),
        ));
    }
    let ns = t.namespace.clone();
    let ns = ns.as_deref();
    if watching {
        let mut field_sel = field_sel;
        if let Some(name) = &t.name {
            field_sel.0.push(super::selector::FieldReq {
                path: "metadata.name".into(),
                value: name.clone(),
                negate: false,
            });
        }
        let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        return watch::serve_watch(app, t.res, ns, labels, field_sel, &query, table).await;
    }
    match (verb, t.sub) {
        ("list", _) => list(&app, t.res, ns, &query, field_sel, table).await,
        ("get", None) => {
            let obj = get_object(&app, t.res, ns, t.name.as_deref().unwrap_or_default()).await?;
            Ok(object_response(t.res, StatusCode::OK, obj, table))
        }
        ("get", Some(Sub::Status)) => {
            let obj = get_object(&app, t.res, ns, t.name.as_deref().unwrap_or_default()).await?;
            Ok(json_response(StatusCode::OK, &obj))
        }
        ("get", Some(Sub::Scale)) => {
            let obj = get_object(&app, t.res, ns, t.name.as_deref().unwrap_or_default()).await?;
            Ok(json_response(StatusCode::OK, &scale_of(&obj)))
        }
        ("get", Some(Sub::Log)) => Err(ApiError::new(
            503,
            "ServiceUnavailable",
            "container logs are not available: this API server has no node log proxy yet",
        )),
        ("create", None) => {
            mark("route");
            let body = read_body(req).await?;
            mark("body");
            let mut obj = parse_body(&body, &content_type)?;
            if let Some(want) = created_name_check
                && meta_str(&obj, "name") != Some(want.as_str())
            {
                return Err(forbidden());
            }
            // Protobuf bodies carry only schema fields.
            let mut warnings = if content_type.starts_with("application/vnd.kubernetes.protobuf") {
                Vec::new()
            } else {
                strip_unknown(t.res, &mut obj, &query)?
            };
            mark("decode");
            let (created, admission_warnings) = create(
                &app,
                t.res,
                ns,
                obj,
                query.get("dryRun").is_some(),
                Owner::Update(&manager),
            )
            .await?;
            warnings.extend(admission_warnings);
            Ok(with_warnings(
                object_response(t.res, StatusCode::CREATED, created, false),
                &warnings,
            ))
        }
        ("create", Some(Sub::Binding)) => {
            let body = read_body(req).await?;
            let b = parse_body(&body, &content_type)?;
            bind(&app, t.res, ns, t.name.as_deref().unwrap_or_default(), &b).await
        }
        ("create", Some(Sub::Eviction)) => {
            let name = t.name.as_deref().unwrap_or_default();
            delete(&app, t.res, ns, name, &Query::default(), &Value::Null).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        ("update", Some(Sub::Finalize)) => {
            let body = read_body(req).await?;
            let obj = parse_body(&body, &content_type)?;
            let name = t.name.as_deref().unwrap_or_default();
            let out = finalize_namespace(&app, t.res, name, &obj).await?;
            Ok(json_response(StatusCode::OK, &out))
        }
        (_, Some(Sub::Finalize)) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
        ("update", sub) => {
            let body = read_body(req).await?;
            let mut obj = parse_body(&body, &content_type)?;
            // Protobuf bodies carry only schema fields.
            let warnings = if content_type.starts_with("application/vnd.kubernetes.protobuf") {
                Vec::new()
            } else {
                strip_unknown(t.res, &mut obj, &query)?
            };
            let name = t.name.as_deref().unwrap_or_default();
            let out = if sub == Some(Sub::Scale) {
                update_scale(&app, t.res, ns, name, &obj, &manager).await?
            } else {
                update(
                    &app,
                    t.res,
                    ns,
                    name,
                    obj,
                    sub,
                    query.get("dryRun").is_some(),
                    &manager,
                )
                .await?
            };
            Ok(with_warnings(
                json_response(StatusCode::OK, &out),
                &warnings,
            ))
        }
        ("patch", sub) => {
            let body = read_body(req).await?;
            let name = t.name.as_deref().unwrap_or_default();
            let (code, out) = patch_object(
                &app,
                t.res,
                ns,
                name,
                sub,
                &body,
                &content_type,
                &query,
                &manager,
            )
            .await?;
            Ok(json_response(code, &out))
        }
        ("delete", None) => {
            let body = read_body(req).await?;
            let opts = if body.is_empty() {
                Value::Null
            } else {
                parse_body(&body, "application/json")?
            };
            let out = delete(
                &app,
                t.res,
                ns,
                t.name.as_deref().unwrap_or_default(),
                &query,
                &opts,
            )
            .await?;
            Ok(json_response(StatusCode::OK, &out))
        }
        ("deletecollection", None) => {
            let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?;
            let (items, _) = list_objects(&app, t.res, ns, &labels, &field_sel).await?;
            for o in &items {
                let name = meta_str(o, "name").unwrap_or_default().to_string();
                let ons = meta_str(o, "namespace").map(str::to_string);
                match delete(&app, t.res, ons.as_deref(), &name, &query, &Value::Null).await {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let kind = format!("{}List", t.res.kind);
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": kind, "apiVersion": t.res.api_version(), "metadata": {}, "items": items}),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn with_warnings(mut r: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append("Warning", v);
        }
    }
    r
}

/// The request body, within the body-limit layer's limit.
async fn read_body(req: Request) -> Result<Bytes> {
    super::limits::read_all(req.into_body()).await
}

/// Parses JSON (or YAML for `*yaml` content types); errors name the problem.
fn parse_body(body: &[u8], content_type: &str) -> Result<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        return super::protobuf::decode_object(body).map_err(ApiError::bad_request);
    }
    let v: Value = if content_type.contains("yaml") {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => serde_yaml::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        }
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "error decoding request body: invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ))
        })?
    };
    Ok(v)
}

/// Handles unknown fields per `fieldValidation`: `Strict` → 400, `Warn` (default) → warnings,
/// `Ignore` → silently dropped. In every mode they are kept out of storage.
fn strip_unknown(res: &Resource, obj: &mut Value, q: &Query) -> Result<Vec<String>> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body of the request was in an unknown format: expected a JSON object for {}",
            res.kind
        )));
    }
    let mode = q.get("fieldValidation").unwrap_or("Warn");
    if !matches!(mode, "Strict" | "Warn" | "Ignore") {
        return Err(ApiError::bad_request(format!(
            "fieldValidation must be one of \"Ignore\", \"Warn\" or \"Strict\", got {mode:?}"
        )));
    }
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or(res.kind)
        .to_string();
    let found = admission::unknown_fields(obj, &kind, true);
    let msgs: Vec<String> = found
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if mode == "Strict" && !msgs.is_empty() {
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            msgs.join(", ")
        )));
    }
    Ok(if mode == "Warn" { msgs } else { Vec::new() })
}

fn check_type(res: &Resource, obj: &Value) -> Result<()> {
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && av != res.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            res.api_version()
        )));
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && k != res.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            res.kind
        )));
    }
    Ok(())
}

pub(crate) async fn get_object<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<Value> {
    match app.store.get(&res.key(ns, name)).await? {
        Some(kv) => decode(res, &kv),
        None => Err(ApiError::not_found(res.group, res.plural, name)),
    }
}

/// One object as the answer (a Table row when asked); names the object for the audit log.
fn object_response(res: &Resource, code: StatusCode, obj: Value, table: bool) -> Response {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut r = object_response_inner(res, code, obj, table);
    if let Some(n) = name {
        r.extensions_mut().insert(super::audit::ObjectName(n));
    }
    r
}

fn object_response_inner(res: &Resource, code: StatusCode, obj: Value, table: bool) -> Response {
    if table {
        let meta = json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null)});
        let mut r = json_response(code, &table::table(res, &[obj], meta, true));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;as=Table;v=v1;g=meta.k8s.io"),
        );
        r
    } else {
        json_response(code, &obj)
    }
}

/// Lists matching objects and the store revision of the read.
pub(crate) async fn list_objects<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Result<(Vec<Value>, Revision)> {
    let (kvs, rev) = app.store.list(&res.list_prefix(ns)).await?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let o = decode(res, kv)?;
        if labels.matches_object(&o) && fields.matches(&o) {
            out.push(o);
        }
    }
    Ok((out, rev))
}

async fn list<S: Store>(
    app: &App<S>,
    res: &'static Resource,
    ns: Option<&str>,
    q: &Query,
    fields: FieldSelector,
    table: bool,
) -> Result<Response> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let limit: Option<usize> = match q.get("limit") {
        Some(l) => Some(
            l.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        )
        .filter(|l| *l > 0),
        None => None,
    };
    // The continue token carries the last key returned and the revision of the first page.
    let (start_after, first_rev) = match q.get("continue") {
        Some(tok) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(tok)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .ok_or_else(|| ApiError::bad_request("continue key is not valid: invalid token"))?;
            (
                raw.get("start").and_then(Value::as_str).map(str::to_string),
                raw.get("rv").and_then(Value::as_i64),
            )
        }
        None => (None, None),
    };
    let (kvs, rev) = list_source(app, res, ns, q).await?;
    if !table && labels.is_empty() && fields.0.is_empty() {
        // Unfiltered JSON lists (the big ones: informers, benchmarks) are assembled from the
        // stored bytes without decoding each object.
        if let Some(r) = raw_list(res, &kvs, rev, start_after.as_deref(), limit, first_rev) {
            return Ok(r);
        }
    }
    let mut items = Vec::new();
    let mut last_key = None;
    let mut more = false;
    for kv in kvs
        .iter()
        .filter(|kv| start_after.as_deref().is_none_or(|s| kv.key.as_str() > s))
    {
        let o = decode(res, kv)?;
        if !(labels.matches_object(&o) && fields.matches(&o)) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            break;
        }
        last_key = Some(kv.key.clone());
        items.push(o);
    }
    let rev = first_rev.unwrap_or(rev);
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if more && let Some(k) = last_key {
        let tok = json!({"start": k, "rv": rev}).to_string();
        meta["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tok));
    }
    if table {
        let mut r = json_response(StatusCode::OK, &table::table(res, &items, meta, true));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;as=Table;v=v1;g=meta.k8s.io"),
        );
        return Ok(r);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": items}),
    ))
}

/// The stored objects a list reads and the revision it is current at: from the watch cache
/// when that is allowed and fresh, else from the store.
///
/// - `resourceVersion=0` ("any"): the cache as it is.
/// - unset or `N` (consistent / not older than N): the cache if a store probe shows nothing
///   under the prefix changed since the cache's revision; the list then carries the probe's
///   (current) revision, as a store read would.
/// - `resourceVersionMatch=Exact` and continued pages: the store.
async fn list_source<S: Store>(
    app: &App<S>,
    res: &'static Resource,
    ns: Option<&str>,
    q: &Query,
) -> Result<(Vec<Versioned>, Revision)> {
    let prefix = res.list_prefix(ns);
    let cacheable = q.get("resourceVersionMatch") != Some("Exact") && q.get("continue").is_none();
    if cacheable && let Some((items, cache_rev)) = app.watch_cache.snapshot(res, &prefix).await {
        if q.get("resourceVersion") == Some("0") {
            return Ok((items, cache_rev));
        }
        let p = app.store.probe(&prefix, cache_rev).await?;
        if !p.written_after && p.count == items.len() {
            return Ok((items, p.revision.max(cache_rev)));
        }
    }
    Ok(app.store.list(&prefix).await?)
}

/// Inserts `"resourceVersion"` into a stored object's `metadata`, as bytes. Stored objects are
/// written by [`encode`] (serde_json, sorted keys, `apiVersion`/`kind` first, no
/// resourceVersion); anything else returns `None` and takes the decoding path.
#[cfg(test)]
fn splice_rv(value: &[u8], rev: Revision) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.len() + 32);
    splice_rv_into(&mut out, value, rev)?;
    Some(out)
}

/// [`splice_rv`] appending to `out` (nothing is appended when it answers `None`).
fn splice_rv_into(out: &mut Vec<u8>, value: &[u8], rev: Revision) -> Option<()> {
    const META: &[u8] = b"\"metadata\":{";
    if !value.starts_with(b"{\"apiVersion\":") {
        return None;
    }
    // Quotes inside JSON strings are escaped, so the first unescaped `"metadata":{` is a key,
    // and `encode` writes the top-level one right after `apiVersion` and `kind`.
    let at = value.windows(META.len()).position(|w| w == META)? + META.len();
    out.extend_from_slice(&value[..at]);
    out.extend_from_slice(b"\"resourceVersion\":\"");
    out.extend_from_slice(rev.to_string().as_bytes());
    out.push(b'"');
    if value.get(at) != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(&value[at..]);
    Some(())
}

fn raw_list(
    res: &Resource,
    kvs: &[Versioned],
    rev: Revision,
    start_after: Option<&str>,
    limit: Option<usize>,
    first_rev: Option<Revision>,
) -> Option<Response> {
    // The page first (no copying), so the envelope can be written before the items and
    // every item copied once, straight into the body.
    let from = kvs
        .iter()
        .position(|kv| start_after.is_none_or(|s| kv.key.as_str() > s))
        .unwrap_or(kvs.len());
    let rest = &kvs[from..];
    let page = &rest[..limit.map_or(rest.len(), |l| l.min(rest.len()))];
    let more = page.len() < rest.len();
    let rev = first_rev.unwrap_or(rev);
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if more && let Some(last) = page.last() {
        let tok = json!({"start": last.key, "rv": rev}).to_string();
        meta["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tok));
    }
    let mut body =
        Vec::with_capacity(page.iter().map(|kv| kv.value.len() + 32).sum::<usize>() + 256);
    body.extend_from_slice(
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{meta},\"items\":[",
            res.kind,
            res.api_version()
        )
        .as_bytes(),
    );
    for (i, kv) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        splice_rv_into(&mut body, &kv.value, kv.mod_revision)?;
    }
    body.extend_from_slice(b"]}");
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Some(r)
}

/// Resets status on create for kinds whose status only controllers and agents write.
fn reset_status_on_create(res: &Resource, obj: &mut Value) {
    if let Value::Object(m) = obj
        && matches!(
            res.kind,
            "Pod" | "Deployment" | "ReplicaSet" | "Service" | "ResourceQuota"
        )
    {
        m.insert("status".into(), json!({}));
    }
}

/// Ensures the namespace exists and is not being terminated for namespaced creates (the
/// NamespaceLifecycle admission plugin).
async fn require_namespace<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<()> {
    if !res.namespaced {
        return Ok(());
    }
    let Some(ns) = ns else {
        return Err(ApiError::bad_request(
            "the namespace of the object must be set for namespaced resources",
        ));
    };
    match app.namespace(ns).await? {
        Some(n) => {
            if n.pointer("/metadata/deletionTimestamp").is_some() {
                let what = res.qualified_plural();
                let mut e = ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "{what} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"
                    ),
                );
                let mut details = json!({"name": name, "kind": res.plural,
                    "causes": [{"reason": "NamespaceTerminating",
                                "message": format!("namespace {ns} is being terminated"),
                                "field": "metadata.namespace"}]});
                if !res.group.is_empty() {
                    details["group"] = json!(res.group);
                }
                e.details = Some(details);
                return Err(e);
            }
            Ok(())
        }
        None => Err(ApiError::not_found("", "namespaces", ns)),
    }
}

/// Creates an object: metadata, defaults, validation, store.
/// Creates an object; also returns admission warnings for the `Warning` header.
pub(crate) async fn create<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    mut obj: Value,
    dry_run: bool,
    owner: Owner<'_>,
) -> Result<(Value, Vec<String>)> {
    check_type(res, &obj)?;
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    if res.namespaced {
        match (meta_str(&obj, "namespace"), ns) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(_), _) | (None, None) => {}
            (None, Some(b)) => obj["metadata"]["namespace"] = json!(b),
        }
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let ns_owned = meta_str(&obj, "namespace").map(str::to_string);
    let ns = if res.namespaced {
        ns_owned.as_deref()
    } else {
        None
    };
    mark("admission");
    require_namespace(app, res, ns, meta_str(&obj, "name").unwrap_or_default()).await?;
    mark("namespace");
    let generate = meta_str(&obj, "name")
        .is_none()
        .then(|| meta_str(&obj, "generateName").map(str::to_string))
        .flatten();
    obj["kind"] = json!(res.kind);
    obj["apiVersion"] = json!(res.api_version());
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.insert("uid".into(), json!(new_uid()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("generation".into(), json!(1));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
    }
    reset_status_on_create(res, &mut obj);
    if let Some(ns) = ns {
        super::policy::limit_ranges(app, res, ns, &mut obj).await?;
    }
    let base = obj;
    let mut name_attempts = 0;
    for attempt in 0..CREATE_ATTEMPTS {
        let mut obj = base.clone();
        if let Some(g) = &generate {
            obj["metadata"]["name"] = json!(format!("{g}{}", random_suffix()));
        }
        let allocations = if res.kind == "Service" {
            allocate_service_addresses(app, &mut obj).await?
        } else {
            Vec::new()
        };
        admission::default_object(res, &mut obj);
        let causes = admission::validate(res, &obj);
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if !causes.is_empty() {
            return Err(ApiError::invalid(res.group, res.kind, &name, causes));
        }
        if let Owner::Update(m) = owner {
            if let Some(meta) = obj["metadata"].as_object_mut() {
                meta.remove("managedFields");
            }
            managed_fields::record_update(res, None, &mut obj, m, None);
        }
        let mut warnings = Vec::new();
        let mut quota_charges = Vec::new();
        if let Some(ns) = ns {
            warnings = super::policy::pod_security(app, res, ns, &obj).await?;
            mark("admission");
            if !dry_run {
                quota_charges =
                    super::policy::resource_quota(app, res, ns, &obj, attempt > 0).await?;
            }
            mark("quota");
        }
        if dry_run {
            return Ok((obj, warnings));
        }
        let key = res.key(ns, &name);
        mark("admission");
        let written = if allocations.is_empty() && quota_charges.is_empty() {
            // Concurrent creates share store transactions (see write_batch).
            app.writes.create(key.clone(), encode(&obj)).await
        } else {
            // The object, its address allocations and the quota usage it is charged are one
            // transaction: a concurrent create that took an address or charged the quota
            // first makes this one fail its guard and start over from fresh reads.
            let mut guards = vec![Guard {
                key: key.clone(),
                mod_revision: 0,
            }];
            let mut ops = vec![TxnOp::Put {
                key: key.clone(),
                value: encode(&obj),
            }];
            for a in &allocations {
                guards.push(Guard {
                    key: a.clone(),
                    mod_revision: 0,
                });
                ops.push(TxnOp::Put {
                    key: a.clone(),
                    value: Bytes::from(key.clone()),
                });
            }
            for (g, op) in quota_charges {
                guards.push(g);
                ops.push(op);
            }
            match app.store.txn(guards, ops).await {
                Err(StoreError::Conflict { .. }) => {
                    if app.store.get(&key).await?.is_some() {
                        Err(StoreError::AlreadyExists)
                    } else {
                        app.admission_cache.invalidate("resourcequotas");
                        let backoff = rand::random_range(0..500 * u64::from((attempt + 1).min(20)));
                        tokio::time::sleep(std::time::Duration::from_micros(backoff)).await;
                        continue;
                    }
                }
                other => other,
            }
        };
        mark("store");
        match written {
            Ok(rev) => {
                app.admission_cache.invalidate(res.plural);
                return Ok((with_rv(obj, rev), warnings));
            }
            Err(StoreError::AlreadyExists) if generate.is_some() && name_attempts < 7 => {
                name_attempts += 1;
                continue;
            }
            Err(StoreError::AlreadyExists) => {
                return Err(ApiError::already_exists(res.group, res.plural, &name));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {}: too many concurrent changes to the names, addresses or quota it needs, please retry",
            res.plural
        ),
    ))
}

/// Tries of one create: generated-name collisions, and lost races for addresses or quota.
const CREATE_ATTEMPTS: u32 = 64;

/// Store key recording that a Service holds a cluster IP (one key per address, so a
/// transaction can claim it atomically; the value is the Service's key).
fn service_ip_key(ip: &str) -> String {
    format!("/registry/ranges/serviceips/{ip}")
}

/// Store key recording that a Service holds a node port.
fn node_port_key(port: i64) -> String {
    format!("/registry/ranges/servicenodeports/{port}")
}

/// The allocation keys a stored Service holds.
fn service_allocation_keys(svc: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        keys.push(service_ip_key(ip));
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p
            .get("nodePort")
            .and_then(Value::as_i64)
            .filter(|n| *n != 0)
        {
            keys.push(node_port_key(np));
        }
    }
    keys
}

/// Guards and deletes for the allocations of the Service stored at `svc_key` (only keys that
/// still name this Service).
async fn release_service_addresses<S: Store>(
    app: &App<S>,
    svc_key: &str,
    svc: &Value,
) -> Result<(Vec<Guard>, Vec<TxnOp>)> {
    let mut guards = Vec::new();
    let mut ops = Vec::new();
    for k in service_allocation_keys(svc) {
        if let Some(kv) = app.store.get(&k).await?
            && kv.value == svc_key.as_bytes()
        {
            guards.push(Guard {
                key: k.clone(),
                mod_revision: kv.mod_revision,
            });
            ops.push(TxnOp::Delete { key: k });
        }
    }
    Ok((guards, ops))
}

/// Service cluster IP range (`--service-cluster-ip-range` default of kube-apiserver).
const SERVICE_NET: [u8; 2] = [10, 96];
/// NodePort range.
const NODE_PORTS: std::ops::RangeInclusive<i64> = 30000..=32767;

/// Gives a new Service its cluster IP (10.96.0.0/12) and node ports, avoiding those in use;
/// returns the allocation keys the create must claim in its transaction (see
/// [`service_ip_key`]), which is what makes concurrent creates unable to share an address.
async fn allocate_service_addresses<S: Store>(
    app: &App<S>,
    svc: &mut Value,
) -> Result<Vec<String>> {
    let ty = svc
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if ty == "ExternalName" {
        return Ok(Vec::new());
    }
    let services = resources::find("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services not registered"))?;
    let (kvs, _) = app.store.list(&services.prefix()).await?;
    let mut used_ips = std::collections::HashSet::new();
    let mut used_ports = std::collections::HashSet::new();
    for kv in &kvs {
        let o = decode(services, kv)?;
        if let Some(ip) = o.pointer("/spec/clusterIP").and_then(Value::as_str) {
            used_ips.insert(ip.to_string());
        }
        for p in o
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
                used_ports.insert(np);
            }
        }
    }
    let name = meta_str(svc, "name").unwrap_or_default().to_string();
    let invalid = |field: &str, v: &Value, why: &str| {
        ApiError::invalid("", "Service", &name, vec![Cause::invalid(field, v, why)])
    };
    let requested = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ip = if requested == "None" {
        requested
    } else if !requested.is_empty() {
        let ok = requested.parse::<std::net::Ipv4Addr>().is_ok_and(|a| {
            a.octets()[0] == SERVICE_NET[0] && (a.octets()[1] & 0xf0) == SERVICE_NET[1]
        });
        if !ok {
            return Err(invalid(
                "spec.clusterIPs",
                &json!(requested),
                "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
            ));
        }
        if used_ips.contains(&requested)
            || app.store.get(&service_ip_key(&requested)).await?.is_some()
        {
            return Err(invalid(
                "spec.clusterIPs",
                &json!(requested),
                "failed to allocate IP: provided IP is already allocated",
            ));
        }
        requested
    } else {
        let mut pick = None;
        for _ in 0..1000 {
            let host: u32 = rand::random_range(10..(1u32 << 20) - 1);
            let a = std::net::Ipv4Addr::new(
                SERVICE_NET[0],
                SERVICE_NET[1] | u8::try_from((host >> 16) & 0x0f).unwrap_or(0),
                u8::try_from((host >> 8) & 0xff).unwrap_or(0),
                u8::try_from(host & 0xff).unwrap_or(0),
            )
            .to_string();
            if !used_ips.contains(&a) {
                pick = Some(a);
                break;
            }
        }
        pick.ok_or_else(|| ApiError::internal("service IP range is full"))?
    };
    svc["spec"]["clusterIP"] = json!(ip);
    svc["spec"]["clusterIPs"] = json!([ip]);
    if ip != "None" {
        svc["spec"]["ipFamilies"] = json!(["IPv4"]);
        svc["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    }
    if (ty == "NodePort" || ty == "LoadBalancer")
        && let Some(Value::Array(ports)) = svc.pointer_mut("/spec/ports")
    {
        for (i, p) in ports.iter_mut().enumerate() {
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np != 0 => {
                    if !NODE_PORTS.contains(&np)
                        || used_ports.contains(&np)
                        || app.store.get(&node_port_key(np)).await?.is_some()
                    {
                        return Err(invalid(
                            &format!("spec.ports[{i}].nodePort"),
                            &json!(np),
                            "provided port is not in the valid range or already allocated; the range of valid ports is 30000-32767",
                        ));
                    }
                    used_ports.insert(np);
                }
                _ => {
                    // A random free port: concurrent creates rarely pick the same one (and
                    // the allocation key settles it when they do).
                    let free: Vec<i64> = NODE_PORTS
                        .clone()
                        .filter(|n| !used_ports.contains(n))
                        .collect();
                    if free.is_empty() {
                        return Err(ApiError::internal("node port range is full"));
                    }
                    let pick = free[rand::random_range(0..free.len())];
                    used_ports.insert(pick);
                    p["nodePort"] = json!(pick);
                }
            }
        }
    }
    Ok(service_allocation_keys(svc))
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        for k in ["metadata", "status", "kind", "apiVersion"] {
            m.remove(k);
        }
    }
    o
}

/// Builds the object to store for an update of `old` by `new` (main resource or `status`).
fn prepare_update(
    res: &Resource,
    old: &Value,
    mut new: Value,
    sub: Option<Sub>,
    owner: Owner<'_>,
) -> Result<Value> {
    check_type(res, &new)?;
    if sub == Some(Sub::Status) {
        // Status writes change nothing but status.
        let mut out = old.clone();
        out["status"] = new.get("status").cloned().unwrap_or_else(|| json!({}));
        if let Owner::Update(m) = owner {
            managed_fields::record_update(res, Some(old), &mut out, m, sub);
        }
        return Ok(out);
    }
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    new["kind"] = json!(res.kind);
    new["apiVersion"] = json!(res.api_version());
    for f in [
        "uid",
        "creationTimestamp",
        "namespace",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old.pointer(&format!("/metadata/{f}")) {
            Some(v) => new["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
    if res.kind == "Namespace" {
        keep_namespace_lifecycle(old, &mut new);
    }
    if res.has(Sub::Status) && res.kind != "Node" && res.kind != "Namespace" {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    if res.kind == "Service"
        && new
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        // An update that leaves the address out keeps the allocated one.
        for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if let Some(v) = old.pointer(&format!("/spec/{f}")) {
                new["spec"][f] = v.clone();
            }
        }
    }
    admission::default_object(res, &mut new);
    if spec_part(old) != spec_part(&new) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(g + 1);
    }
    match owner {
        Owner::Update(m) => managed_fields::record_update(res, Some(old), &mut new, m, sub),
        Owner::Prepared => {}
    }
    Ok(new)
}

/// Writes `new` over the stored `old` at `old_rev`, finishing deletions whose finalizers are gone.
#[allow(
    clippy::too_many_arguments,
    reason = "the update's full context; one internal helper"
)]
async fn store_update<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    old: &Value,
    old_rev: Revision,
    new: Value,
    dry_run: bool,
) -> Result<Value> {
    let mut causes = admission::validate(res, &new);
    causes.extend(admission::validate_update(res, old, &new));
    if !causes.is_empty() {
        return Err(ApiError::invalid(res.group, res.kind, name, causes));
    }
    if dry_run {
        return Ok(new);
    }
    let key = res.key(ns, name);
    app.admission_cache.invalidate(res.plural);
    let finalizers_gone = new
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
        && namespace_finalized(res, &new);
    let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
    let grace_done = new
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_none_or(|g| g == 0);
    if deleting && finalizers_gone && grace_done {
        return match app.store.delete(&key, Some(old_rev)).await {
            Ok(_) => Ok(new),
            Err(StoreError::Conflict { .. }) => {
                Err(ApiError::conflict(res.group, res.plural, name))
            }
            Err(StoreError::NotFound) => Err(ApiError::not_found(res.group, res.plural, name)),
            Err(e) => Err(e.into()),
        };
    }
    // Concurrent updates share store transactions (see write_batch).
    match app.writes.update(key, encode(&new), old_rev).await {
        Ok(rev) => Ok(with_rv(new, rev)),
        Err(StoreError::Conflict { .. }) => Err(ApiError::conflict(res.group, res.plural, name)),
        Err(StoreError::NotFound) => Err(ApiError::not_found(res.group, res.plural, name)),
        Err(e) => Err(e.into()),
    }
}

fn parse_rv(s: &str) -> Result<Revision> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the request"
)]
async fn update<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    obj: Value,
    sub: Option<Sub>,
    dry_run: bool,
    manager: &str,
) -> Result<Value> {
    if let Some(n) = meta_str(&obj, "name")
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let Some(kv) = app.store.get(&res.key(ns, name)).await? else {
        return Err(ApiError::not_found(res.group, res.plural, name));
    };
    if let Some(rv) = meta_str(&obj, "resourceVersion")
        && parse_rv(rv)? != kv.mod_revision
    {
        return Err(ApiError::conflict(res.group, res.plural, name));
    }
    let old = decode(res, &kv)?;
    let mut obj = obj;
    if obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"]["name"] = json!(name);
    }
    let new = prepare_update(res, &old, obj, sub, Owner::Update(manager))?;
    store_update(app, res, ns, name, &old, kv.mod_revision, new, dry_run).await
}

fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut m = json!({});
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = meta.get(f) {
            m[f] = v.clone();
        }
    }
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": m,
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

async fn update_scale<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    scale: &Value,
    manager: &str,
) -> Result<Value> {
    let Some(kv) = app.store.get(&res.key(ns, name)).await? else {
        return Err(ApiError::not_found(res.group, res.plural, name));
    };
    if let Some(rv) = meta_str(scale, "resourceVersion")
        && parse_rv(rv)? != kv.mod_revision
    {
        return Err(ApiError::conflict(res.group, res.plural, name));
    }
    let old = decode(res, &kv)?;
    let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
    if replicas.as_i64().is_none_or(|r| r < 0) {
        return Err(ApiError::invalid(
            "autoscaling",
            "Scale",
            name,
            vec![Cause::invalid(
                "spec.replicas",
                &replicas,
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut new = old.clone();
    new["spec"]["replicas"] = replicas;
    let new = prepare_update(res, &old, new, None, Owner::Update(manager))?;
    let out = store_update(app, res, ns, name, &old, kv.mod_revision, new, false).await?;
    Ok(scale_of(&out))
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the request"
)]
async fn patch_object<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    sub: Option<Sub>,
    body: &[u8],
    content_type: &str,
    q: &Query,
    manager: &str,
) -> Result<(StatusCode, Value)> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let kind = match ct {
        "application/merge-patch+json" => "merge",
        "application/json-patch+json" => "json",
        "application/strategic-merge-patch+json" => "strategic",
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => "apply",
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                ),
            ));
        }
    };
    let mut patch_doc = parse_body(body, if kind == "apply" { "yaml" } else { "json" })?;
    let mut warnings = Vec::new();
    if kind == "apply" || kind == "strategic" || kind == "merge" {
        if sub.is_none() && patch_doc.is_object() {
            warnings = strip_unknown(res, &mut patch_doc, q)?;
        } else if !patch_doc.is_object() {
            return Err(ApiError::bad_request("the patch must be a JSON object"));
        }
    }
    let _ = warnings;
    let dry_run = q.get("dryRun").is_some();
    if kind == "apply" && q.get("fieldManager").is_none() {
        return Err(ApiError::bad_request(
            "fieldManager is required for apply requests",
        ));
    }
    let force = q.flag("force");
    // Server-side apply of the main resource tracks field ownership; on subresources it
    // merges like a strategic patch.
    let ssa = kind == "apply" && sub.is_none();
    // Patches without a resourceVersion retry on conflicts, as Kubernetes does.
    for _ in 0..5 {
        let kv = app.store.get(&res.key(ns, name)).await?;
        let Some(kv) = kv else {
            if kind == "apply" && sub.is_none() {
                let mut obj = patch_doc.clone();
                if obj.get("metadata").is_none_or(|m| !m.is_object()) {
                    obj["metadata"] = json!({});
                }
                if meta_str(&obj, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        meta_str(&obj, "name").unwrap_or_default()
                    )));
                }
                obj["metadata"]["name"] = json!(name);
                let obj = managed_fields::apply(res, None, &obj, manager, force)
                    .map_err(|c| managed_fields::conflict_error(&c))?;
                let (created, _) = create(app, res, ns, obj, dry_run, Owner::Prepared).await?;
                return Ok((StatusCode::CREATED, created));
            }
            return Err(ApiError::not_found(res.group, res.plural, name));
        };
        let old = decode(res, &kv)?;
        let base = if sub == Some(Sub::Scale) {
            scale_of(&old)
        } else {
            old.clone()
        };
        let patched = match kind {
            "merge" => {
                let mut t = base.clone();
                patch::merge_patch(&mut t, &patch_doc);
                t
            }
            "apply" if ssa => managed_fields::apply(res, Some(&base), &patch_doc, manager, force)
                .map_err(|c| managed_fields::conflict_error(&c))?,
            "json" => patch::json_patch(&base, &patch_doc).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
            _ => patch::strategic_merge(&base, &patch_doc).map_err(ApiError::bad_request)?,
        };
        let owner = if ssa {
            Owner::Prepared
        } else {
            Owner::Update(manager)
        };
        let explicit_rv = patch_doc
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(rv) = &explicit_rv
            && parse_rv(rv)? != kv.mod_revision
        {
            return Err(ApiError::conflict(res.group, res.plural, name));
        }
        if meta_str(&patched, "name") != Some(name) {
            return Err(ApiError::bad_request(
                "the patch may not change metadata.name",
            ));
        }
        let new = if sub == Some(Sub::Scale) {
            let replicas = patched
                .pointer("/spec/replicas")
                .cloned()
                .unwrap_or(json!(0));
            if replicas.as_i64().is_none_or(|r| r < 0) {
                return Err(ApiError::invalid(
                    "autoscaling",
                    "Scale",
                    name,
                    vec![Cause::invalid(
                        "spec.replicas",
                        &replicas,
                        "must be greater than or equal to 0",
                    )],
                ));
            }
            let mut n = old.clone();
            n["spec"]["replicas"] = replicas;
            prepare_update(res, &old, n, None, owner)?
        } else {
            prepare_update(res, &old, patched, sub, owner)?
        };
        match store_update(app, res, ns, name, &old, kv.mod_revision, new, dry_run).await {
            Ok(out) => {
                let out = if sub == Some(Sub::Scale) {
                    scale_of(&out)
                } else {
                    out
                };
                return Ok((StatusCode::OK, out));
            }
            Err(e) if e.code == 409 && explicit_rv.is_none() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::conflict(res.group, res.plural, name))
}

/// Deletes an object; pods bound to a node and objects with finalizers are only marked.
pub(crate) async fn delete<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    q: &Query,
    opts: &Value,
) -> Result<Value> {
    // As Kubernetes' storage does: a delete the client did not pin to a resourceVersion is not
    // refused because something else (a controller's status update) wrote the object between
    // the read and the write; it reads again and goes on. A pinned one fails with 409.
    let pinned = opts.pointer("/preconditions/resourceVersion").is_some();
    for _ in 0..DELETE_ATTEMPTS {
        match delete_attempt(app, res, ns, name, q, opts).await? {
            Deleted::Done(v) => return Ok(v),
            Deleted::Raced if pinned => break,
            Deleted::Raced => {}
        }
    }
    Err(ApiError::conflict(res.group, res.plural, name))
}

/// Reads and writes a delete tries before it gives up on an object that keeps changing.
const DELETE_ATTEMPTS: u32 = 16;

/// How one attempt of [`delete`] ended.
enum Deleted {
    Done(Value),
    /// The object changed between the read and the write: nothing was written.
    Raced,
}

async fn delete_attempt<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    q: &Query,
    opts: &Value,
) -> Result<Deleted> {
    let key = res.key(ns, name);
    let Some(kv) = app.store.get(&key).await? else {
        return Err(ApiError::not_found(res.group, res.plural, name));
    };
    app.admission_cache.invalidate(res.plural);
    let old = decode(res, &kv)?;
    if let Some(uid) = opts.pointer("/preconditions/uid").and_then(Value::as_str)
        && meta_str(&old, "uid") != Some(uid)
    {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(&old, "uid").unwrap_or_default()
            ),
        ));
    }
    if let Some(rv) = opts
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        && parse_rv(rv)? != kv.mod_revision
    {
        return Err(ApiError::conflict(res.group, res.plural, name));
    }
    if res.kind == "Namespace" {
        return delete_namespace(app, res, name, &key, kv.mod_revision, old, q, opts)
            .await
            .map(Deleted::Done);
    }
    let requested_grace = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
        .or_else(|| opts.get("gracePeriodSeconds").and_then(Value::as_i64));
    let grace = if res.kind == "Pod" {
        let unbound = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        let terminal = matches!(
            old.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if unbound || terminal {
            0
        } else {
            requested_grace
                .or_else(|| {
                    old.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0)
        }
    } else {
        0
    };
    // Foreground and Orphan propagation are finalizers the garbage collector acts on; the
    // object stays (marked) until it removes them.
    // Only kinds the garbage collector finalizes as owners get them: nothing else here owns
    // dependents, so for other kinds every policy means the same as Background.
    let mut marked = old.clone();
    let policy = propagation_finalizer(q, opts)?;
    let policy_changed = match policy {
        Some(finalizer) if matches!(res.kind, "Deployment" | "ReplicaSet") => {
            set_propagation_finalizer(&mut marked, finalizer)
        }
        _ => false,
    };
    let has_finalizers = marked
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let already = old
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64);
    if grace > 0 || has_finalizers {
        if old.pointer("/metadata/deletionTimestamp").is_some()
            && already.is_some_and(|a| a <= grace)
            && !policy_changed
        {
            return Ok(Deleted::Done(old));
        }
        let mut new = marked;
        let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
        new["metadata"]["deletionTimestamp"] =
            json!(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        // Graceful deletions of many pods (a scale-down, a drain) share store transactions.
        return match app
            .writes
            .update(key.clone(), encode(&new), kv.mod_revision)
            .await
        {
            Ok(rev) => Ok(Deleted::Done(with_rv(new, rev))),
            Err(StoreError::Conflict { .. }) => Ok(Deleted::Raced),
            Err(e) => Err(e.into()),
        };
    }
    if res.kind == "Service" {
        let (mut guards, mut ops) = release_service_addresses(app, &key, &old).await?;
        guards.push(Guard {
            key: key.clone(),
            mod_revision: kv.mod_revision,
        });
        ops.push(TxnOp::Delete { key: key.clone() });
        return match app.store.txn(guards, ops).await {
            Ok(_) => Ok(Deleted::Done(old)),
            Err(StoreError::Conflict { .. }) => Ok(Deleted::Raced),
            Err(e) => Err(e.into()),
        };
    }
    match app.store.delete(&key, Some(kv.mod_revision)).await {
        Ok(_) => Ok(Deleted::Done(old)),
        Err(StoreError::Conflict { .. }) => Ok(Deleted::Raced),
        Err(StoreError::NotFound) => Err(ApiError::not_found(res.group, res.plural, name)),
        Err(e) => Err(e.into()),
    }
}

/// The finalizer a delete's propagation policy asks for (`?propagationPolicy=` or the
/// DeleteOptions body; the legacy `orphanDependents: true` means Orphan); `None` = Background.
fn propagation_finalizer(q: &Query, opts: &Value) -> Result<Option<&'static str>> {
    let policy = q
        .get("propagationPolicy")
        .or_else(|| opts.get("propagationPolicy").and_then(Value::as_str));
    let orphan_dependents = q.get("orphanDependents") == Some("true")
        || opts.get("orphanDependents").and_then(Value::as_bool) == Some(true);
    match (policy, orphan_dependents) {
        (Some("Foreground"), _) => Ok(Some(FOREGROUND_FINALIZER)),
        (Some("Orphan"), _) | (None, true) => Ok(Some(ORPHAN_FINALIZER)),
        (Some("Background") | None, _) => Ok(None),
        (Some(other), _) => Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            ),
        )),
    }
}

const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
const ORPHAN_FINALIZER: &str = "orphan";

/// Puts `finalizer` on `obj` in place of the other propagation finalizer; whether it changed.
fn set_propagation_finalizer(obj: &mut Value, finalizer: &str) -> bool {
    let other = if finalizer == ORPHAN_FINALIZER {
        FOREGROUND_FINALIZER
    } else {
        ORPHAN_FINALIZER
    };
    let mut list: Vec<Value> = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let before = list.clone();
    list.retain(|f| f.as_str() != Some(other));
    if !list.iter().any(|f| f.as_str() == Some(finalizer)) {
        list.push(json!(finalizer));
    }
    let changed = list != before;
    obj["metadata"]["finalizers"] = Value::Array(list);
    changed
}

/// Namespaces that may never be deleted (the NamespaceLifecycle admission plugin's list).
const UNDELETABLE_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

fn spec_finalizers(ns: &Value) -> &[Value] {
    ns.pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Whether nothing in `spec.finalizers` holds the object back (always true except for a
/// Namespace still waiting for the namespace controller).
fn namespace_finalized(res: &Resource, obj: &Value) -> bool {
    res.kind != "Namespace" || spec_finalizers(obj).is_empty()
}

/// A namespace's lifecycle is not the writer's to change: a main-resource update keeps
/// `spec.finalizers` (written only through `finalize`) and `status` (through `status`).
fn keep_namespace_lifecycle(old: &Value, new: &mut Value) {
    match old.pointer("/spec/finalizers") {
        Some(f) => new["spec"]["finalizers"] = f.clone(),
        None => {
            if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("finalizers");
            }
        }
    }
    match old.get("status") {
        Some(st) => new["status"] = st.clone(),
        None => {
            if let Some(m) = new.as_object_mut() {
                m.remove("status");
            }
        }
    }
}

/// DELETE of a namespace, as kube-apiserver does it: the first delete marks it
/// (`deletionTimestamp`, phase `Terminating`) and returns it; the namespace controller then
/// deletes its contents and removes its `kubernetes` entry of `spec.finalizers` through
/// [`finalize_namespace`], which removes the object once no finalizer is left. A namespace
/// with no finalizer at all goes at once.
#[allow(
    clippy::too_many_arguments,
    reason = "the DELETE request's full context; one caller"
)]
async fn delete_namespace<S: Store>(
    app: &App<S>,
    res: &Resource,
    name: &str,
    key: &str,
    rev: Revision,
    old: Value,
    q: &Query,
    opts: &Value,
) -> Result<Value> {
    if UNDELETABLE_NAMESPACES.contains(&name) {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
        ));
    }
    // Validated as for any delete; nothing owns dependents through a namespace, so every
    // policy means the same here.
    propagation_finalizer(q, opts)?;
    app.admission_cache.invalidate(res.plural);
    let conflict = |e: StoreError| match e {
        StoreError::Conflict { .. } => ApiError::conflict(res.group, res.plural, name),
        StoreError::NotFound => ApiError::not_found(res.group, res.plural, name),
        e => e.into(),
    };
    let meta_finalized = old
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    if old.pointer("/metadata/deletionTimestamp").is_some() {
        // Already terminating: the controller is at work; a repeated DELETE changes nothing.
        if namespace_finalized(res, &old) && meta_finalized {
            app.store.delete(key, Some(rev)).await.map_err(conflict)?;
        }
        return Ok(old);
    }
    if namespace_finalized(res, &old) && meta_finalized {
        app.store.delete(key, Some(rev)).await.map_err(conflict)?;
        return Ok(old);
    }
    let mut marked = old;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    marked["metadata"]["deletionTimestamp"] = json!(now);
    marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    if !marked.get("status").is_some_and(Value::is_object) {
        marked["status"] = json!({});
    }
    marked["status"]["phase"] = json!("Terminating");
    let rev = app
        .store
        .update(key, encode(&marked), rev)
        .await
        .map_err(conflict)?;
    Ok(with_rv(marked, rev))
}

/// PUT `namespaces/{name}/finalize`: replaces `spec.finalizers` (nothing else) and removes a
/// terminating namespace once neither `spec.finalizers` nor `metadata.finalizers` is left.
async fn finalize_namespace<S: Store>(
    app: &App<S>,
    res: &Resource,
    name: &str,
    body: &Value,
) -> Result<Value> {
    if let Some(n) = meta_str(body, "name")
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let finalizers = match body.pointer("/spec/finalizers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.iter().all(|f| f.as_str().is_some_and(|f| !f.is_empty())) => {
            a.clone()
        }
        Some(v) => {
            return Err(ApiError::invalid(
                res.group,
                res.kind,
                name,
                vec![Cause::invalid(
                    "spec.finalizers",
                    v,
                    "must be a list of non-empty names",
                )],
            ));
        }
    };
    let explicit_rv = meta_str(body, "resourceVersion")
        .map(parse_rv)
        .transpose()?;
    // Without a resourceVersion the write is retried over concurrent changes (a guaranteed
    // update); with one it is a precondition.
    for _ in 0..5 {
        let key = res.key(None, name);
        let Some(kv) = app.store.get(&key).await? else {
            return Err(ApiError::not_found(res.group, res.plural, name));
        };
        if explicit_rv.is_some_and(|rv| rv != kv.mod_revision) {
            return Err(ApiError::conflict(res.group, res.plural, name));
        }
        let mut new = decode(res, &kv)?;
        new["spec"]["finalizers"] = Value::Array(finalizers.clone());
        app.admission_cache.invalidate(res.plural);
        let gone = new.pointer("/metadata/deletionTimestamp").is_some()
            && finalizers.is_empty()
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        let written = if gone {
            app.store
                .delete(&key, Some(kv.mod_revision))
                .await
                .map(|_| new.clone())
        } else {
            app.store
                .update(&key, encode(&new), kv.mod_revision)
                .await
                .map(|rev| with_rv(new.clone(), rev))
        };
        match written {
            Ok(out) => return Ok(out),
            Err(StoreError::Conflict { .. }) if explicit_rv.is_none() => continue,
            Err(StoreError::Conflict { .. }) => {
                return Err(ApiError::conflict(res.group, res.plural, name));
            }
            Err(StoreError::NotFound) => {
                return Err(ApiError::not_found(res.group, res.plural, name));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(res.group, res.plural, name))
}

async fn bind<S: Store>(
    app: &App<S>,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    binding: &Value,
) -> Result<Response> {
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid("", "Binding", name, vec![Cause::required("target.name")])
        })?
        .to_string();
    for _ in 0..5 {
        let Some(kv) = app.store.get(&res.key(ns, name)).await? else {
            return Err(ApiError::not_found(res.group, res.plural, name));
        };
        let old = decode(res, &kv)?;
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is being deleted, cannot be assigned to a host"
                ),
            ));
        }
        if let Some(cur) = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{cur}\""
                ),
            ));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        // Many binds per store transaction (see write_batch).
        match app
            .writes
            .update(kv.key, encode(&new), kv.mod_revision)
            .await
        {
            Ok(_) => {
                return Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(res.group, res.plural, name))
}

fn self_subject_access_review(id: &Identity, mut review: Value) -> Result<Response> {
    let ra = review
        .pointer("/spec/resourceAttributes")
        .cloned()
        .unwrap_or(Value::Null);
    let s = |k: &str| ra.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let verb: &'static str = match s("verb").unwrap_or("get") {
        "get" => "get",
        "list" => "list",
        "watch" => "watch",
        "create" => "create",
        "update" => "update",
        "patch" => "patch",
        "delete" => "delete",
        "deletecollection" => "deletecollection",
        _ => "unknown",
    };
    let allowed = verb != "unknown"
        && authorize(
            id,
            &Attributes {
                verb,
                group: s("group").unwrap_or(""),
                resource: s("resource").unwrap_or(""),
                subresource: s("subresource"),
                namespace: s("namespace"),
                name: s("name"),
                field_node_name: None,
                field_name: None,
            },
        ) == Decision::Allow;
    review["status"] = json!({"allowed": allowed});
    review["kind"] = json!("SelfSubjectAccessReview");
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    Ok(json_response(StatusCode::CREATED, &review))
}

/// Whether a pod in `ns` bound to `node` uses the configmap or secret `name` (`plural` says
/// which): in a volume, an `env[].valueFrom` or an `envFrom`. Decides node reads of them.
async fn referenced_by_pod_on<S: Store>(
    app: &App<S>,
    node: &str,
    ns: &str,
    plural: &str,
    name: &str,
) -> Result<bool> {
    let pods =
        super::resources::find("", "v1", "pods").expect("invariant: pods are a served resource");
    let (items, _) = app.store.list(&pods.list_prefix(Some(ns))).await?;
    for kv in &items {
        let pod = decode(pods, kv)?;
        if pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
            && pod_references(&pod, plural, name)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `pod` references the configmap or secret `name`.
fn pod_references(pod: &Value, plural: &str, name: &str) -> bool {
    let (volume_key, volume_name, ref_key) = match plural {
        "configmaps" => ("configMap", "name", "configMapKeyRef"),
        _ => ("secret", "secretName", "secretKeyRef"),
    };
    let env_from_key = match plural {
        "configmaps" => "configMapRef",
        _ => "secretRef",
    };
    let named = |v: Option<&Value>, field: &str| {
        v.and_then(|v| v.get(field)).and_then(Value::as_str) == Some(name)
    };
    let array = |v: &Value, key: &str| -> Vec<Value> {
        v.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let spec = pod.get("spec").cloned().unwrap_or_default();
    let in_volumes = array(&spec, "volumes")
        .iter()
        .any(|v| named(v.get(volume_key), volume_name));
    let containers = array(&spec, "containers")
        .into_iter()
        .chain(array(&spec, "initContainers"));
    in_volumes
        || containers.into_iter().any(|c| {
            array(&c, "env")
                .iter()
                .any(|e| named(e.pointer("/valueFrom").and_then(|f| f.get(ref_key)), "name"))
                || array(&c, "envFrom")
                    .iter()
                    .any(|e| named(e.get(env_from_key), "name"))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn delete_propagation_policy_becomes_a_finalizer() {
        let q = |s: &str| super::Query::parse(Some(s));
        let none = serde_json::Value::Null;
        let fg = serde_json::json!({"propagationPolicy": "Foreground"});
        assert_eq!(
            super::propagation_finalizer(&q(""), &fg).ok(),
            Some(Some("foregroundDeletion"))
        );
        assert_eq!(
            super::propagation_finalizer(&q("propagationPolicy=Orphan"), &none).ok(),
            Some(Some("orphan"))
        );
        let legacy = serde_json::json!({"orphanDependents": true});
        assert_eq!(
            super::propagation_finalizer(&q(""), &legacy).ok(),
            Some(Some("orphan"))
        );
        assert_eq!(
            super::propagation_finalizer(&q("propagationPolicy=Background"), &none).ok(),
            Some(None)
        );
        assert!(super::propagation_finalizer(&q("propagationPolicy=Sideways"), &none).is_err());
        let mut obj = serde_json::json!({"metadata": {"finalizers": ["a", "orphan"]}});
        assert!(super::set_propagation_finalizer(
            &mut obj,
            "foregroundDeletion"
        ));
        assert_eq!(
            obj["metadata"]["finalizers"],
            serde_json::json!(["a", "foregroundDeletion"])
        );
        assert!(!super::set_propagation_finalizer(
            &mut obj,
            "foregroundDeletion"
        ));
    }

    #[test]
    fn node_reads_only_what_its_pods_reference() {
        let pod = serde_json::json!({"spec": {
            "volumes": [{"name": "v", "configMap": {"name": "app"}},
                        {"name": "s", "secret": {"secretName": "creds"}}],
            "containers": [{"name": "c",
                "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "token", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "envs"}}]}]}});
        assert!(super::pod_references(&pod, "configmaps", "app"));
        assert!(super::pod_references(&pod, "configmaps", "envs"));
        assert!(super::pod_references(&pod, "secrets", "creds"));
        assert!(super::pod_references(&pod, "secrets", "token"));
        assert!(!super::pod_references(&pod, "secrets", "app"));
        assert!(!super::pod_references(&pod, "configmaps", "creds"));
        assert!(!super::pod_references(&pod, "configmaps", "other"));
    }

    use super::*;
    use crate::storage::MemStore;

    /// An API server's handler state on an in-memory store holding the `default` namespace.
    async fn mem_app(store: &MemStore) -> App<MemStore> {
        let app = App {
            watch_cache: Arc::new(super::super::watch_cache::WatchCache::new(
                store.clone(),
                tokio_util::task::TaskTracker::new(),
                tokio_util::sync::CancellationToken::new(),
            )),
            writes: super::super::write_batch::WriteBatcher::new(store.clone()),
            store: store.clone(),
            admission_cache: super::super::admission_cache::AdmissionCache::default(),
            server_address: "127.0.0.1".into(),
            tasks: tokio_util::task::TaskTracker::new(),
        };
        let nsres = resources::find("", "v1", "namespaces").expect("namespaces");
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
        create(&app, nsres, None, ns, false, Owner::Update("test"))
            .await
            .expect("namespace");
        app
    }

    /// A delete the client did not pin to a resourceVersion outlasts writers that change the
    /// object between its read and its write (a controller's status update); a pinned one
    /// answers 409 and writes nothing; an object that never stops changing ends in 409 too.
    #[tokio::test]
    async fn unpinned_delete_retries_racing_writers_and_a_pinned_one_conflicts() {
        let store = MemStore::new();
        let app = mem_app(&store).await;
        let cms = resources::find("", "v1", "configmaps").expect("configmaps");
        let rss = resources::find("apps", "v1", "replicasets").expect("replicasets");
        let new_cm = |name: &str| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "default"}, "data": {"k": "v"}})
        };
        let none = Query::parse(None);
        for name in ["raced", "pinned", "busy"] {
            create(
                &app,
                cms,
                Some("default"),
                new_cm(name),
                false,
                Owner::Update("test"),
            )
            .await
            .expect("create configmap");
        }

        let raced = cms.key(Some("default"), "raced");
        store.race_reads(&raced, 3);
        delete(&app, cms, Some("default"), "raced", &none, &Value::Null)
            .await
            .expect("an unpinned delete outlasts three racing writes");
        assert!(store.get(&raced).await.expect("get").is_none());

        let pinned = cms.key(Some("default"), "pinned");
        let rv = store
            .get(&pinned)
            .await
            .expect("get")
            .expect("exists")
            .mod_revision;
        store.race_reads(&pinned, 1);
        let opts = json!({"preconditions": {"resourceVersion": rv.to_string()}});
        let err = delete(&app, cms, Some("default"), "pinned", &none, &opts)
            .await
            .expect_err("a pinned delete must not retry");
        assert_eq!(err.code, 409, "{}", err.message);
        assert!(store.get(&pinned).await.expect("get").is_some());

        let busy = cms.key(Some("default"), "busy");
        store.race_reads(&busy, u32::MAX);
        let err = delete(&app, cms, Some("default"), "busy", &none, &Value::Null)
            .await
            .expect_err("retries are bounded");
        assert_eq!(err.code, 409, "{}", err.message);
        assert!(store.get(&busy).await.expect("get").is_some());
        store.race_reads(&busy, 0);

        // The Orphan finalizer mark (the CI failure that found this): marked, not refused.
        let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "orph", "namespace": "default"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a"}},
                    "spec": {"containers": [{"name": "c", "image": "x.wasm"}]}}}});
        create(&app, rss, Some("default"), rs, false, Owner::Update("test"))
            .await
            .expect("create replicaset");
        store.race_reads(&rss.key(Some("default"), "orph"), 2);
        let orphan = Query::parse(Some("propagationPolicy=Orphan"));
        let out = delete(&app, rss, Some("default"), "orph", &orphan, &Value::Null)
            .await
            .expect("an orphan delete outlasts racing status updates");
        assert_eq!(out["metadata"]["finalizers"], json!(["orphan"]));
        assert!(out.pointer("/metadata/deletionTimestamp").is_some());
    }

    /// Binds and status updates of many pods arriving together share store transactions;
    /// of two status writers holding the same resourceVersion only the first succeeds and
    /// the other gets its own 409, as if each had written alone.
    #[tokio::test]
    async fn binds_and_status_updates_share_transactions() {
        let store = MemStore::new();
        let app = mem_app(&store).await;
        let pods = resources::find("", "v1", "pods").expect("pods");
        let n = 200;
        let mut rvs = Vec::new();
        for i in 0..n {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{i}"), "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "x.wasm"}]}});
            let (out, _) = create(
                &app,
                pods,
                Some("default"),
                pod,
                false,
                Owner::Update("test"),
            )
            .await
            .expect("create pod");
            rvs.push(
                meta_str(&out, "resourceVersion")
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        let status = |i: usize, phase: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{i}"), "namespace": "default",
                    "resourceVersion": rvs[i]},
                "status": {"phase": phase}})
        };
        let app = &app;
        let binds = (0..n / 2).map(|i| async move {
            let name = format!("p-{i}");
            let b = json!({"target": {"name": format!("node-{}", i % 7)}});
            bind(app, pods, Some("default"), &name, &b)
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.code)
        });
        let mut updates: Vec<_> = (n / 2..n).map(|i| (i, status(i, "Running"))).collect();
        // A second writer of pod 150 with the same resourceVersion, queued last.
        updates.push((150, status(150, "Failed")));
        let updates = updates.into_iter().map(|(i, obj)| async move {
            let name = format!("p-{i}");
            update(
                app,
                pods,
                Some("default"),
                &name,
                obj,
                Some(Sub::Status),
                false,
                "agent",
            )
            .await
            .map(|o| {
                meta_str(&o, "resourceVersion")
                    .unwrap_or_default()
                    .to_string()
            })
            .map_err(|e| e.code)
        });
        let (bound, updated) = futures::future::join(
            futures::future::join_all(binds),
            futures::future::join_all(updates),
        )
        .await;
        assert!(bound.iter().all(|r| *r == Ok(201)), "{bound:?}");
        let (last, rest) = updated.split_last().expect("updates");
        assert_eq!(*last, Err(409), "the second writer of p-150");
        assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
        let (kvs, _) = store
            .list(&pods.list_prefix(Some("default")))
            .await
            .expect("list");
        let mut revisions = std::collections::HashSet::new();
        for kv in &kvs {
            let o = decode(pods, kv).expect("decode");
            let i: usize = meta_str(&o, "name")
                .and_then(|n| n.strip_prefix("p-"))
                .and_then(|n| n.parse().ok())
                .expect("name");
            if i < n / 2 {
                assert!(o.pointer("/spec/nodeName").is_some(), "p-{i} bound");
            } else {
                assert_eq!(o.pointer("/status/phase"), Some(&json!("Running")), "p-{i}");
            }
            revisions.insert(kv.mod_revision);
        }
        // 200 writes in a few shared transactions (128 per transaction at most).
        assert!(revisions.len() <= 3, "{} revisions", revisions.len());
    }

    #[test]
    fn stored_form_and_resource_version_splice() {
        let obj = json!({"spec": {"template": {"metadata": {"labels": {"a": "b"}}}}, "kind": "Deployment",
                         "metadata": {"name": "d", "resourceVersion": "9", "annotations": {"x": "\"metadata\":{"}},
                         "apiVersion": "apps/v1"});
        let stored = encode(&obj);
        assert!(
            stored
                .starts_with(b"{\"apiVersion\":\"apps/v1\",\"kind\":\"Deployment\",\"metadata\":{")
        );
        let spliced = splice_rv(&stored, 42).expect("splice");
        let v: Value = serde_json::from_slice(&spliced).expect("valid JSON");
        let mut want = obj.clone();
        want["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(v, want);
        let empty_meta = encode(&json!({"apiVersion": "v1", "kind": "X"}));
        let v: Value =
            serde_json::from_slice(&splice_rv(&empty_meta, 1).expect("splice")).expect("json");
        assert_eq!(v["metadata"], json!({"resourceVersion": "1"}));
        assert!(splice_rv(b"{\"kind\":\"X\"}", 1).is_none());
    }
}
