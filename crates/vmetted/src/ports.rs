//! A session's network and the ports it publishes: the request's network
//! becomes the library's [`vmette::Nat`], and ports are published and
//! closed on a running session.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vmette::{
    AllowedCidr, AllowedHost, Allowlist, BadRule, DenialCounts, Egress, Nat, Network, PortMapping,
    PublishedPort, MAX_RULES,
};
use vmette_api::{DeniedCounts, ErrorBody, NetworkRequest, PortRequest, PublishedPortInfo};

use crate::api::{blocking, ApiError, ApiJson, ApiPath, ApiResult, Daemon};
use crate::openapi::{JsonBodyFailures, PortPath, SessionPath};

fn invalid(message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
}

/// The library's network for a request's.
pub fn network(request: &NetworkRequest) -> ApiResult<Network> {
    let publish = request
        .publish
        .iter()
        .map(mapping)
        .collect::<ApiResult<Vec<_>>>()?;
    if request.host_ports.contains(&0) {
        return Err(invalid("host ports are 1 to 65535".into()));
    }
    let dns = request
        .dns
        .as_deref()
        .map(|text| {
            vmette::net::resolver::server_address(text)
                .ok_or_else(|| invalid(format!("dns {text:?} is not IP or IP:PORT")))
        })
        .transpose()?;
    Ok(Network::Nat(Nat {
        egress: egress(request)?,
        host_ports: request.host_ports.clone(),
        publish,
        dns,
    }))
}

/// Where the request lets the guest's connections go: only where its
/// allow lists say, when it has any.
fn egress(request: &NetworkRequest) -> ApiResult<Egress> {
    if request.allow_hosts.is_empty() && request.allow_cidrs.is_empty() {
        return Ok(if request.outbound {
            Egress::Open
        } else {
            Egress::Closed
        });
    }
    if request.allow_hosts.len() > MAX_RULES || request.allow_cidrs.len() > MAX_RULES {
        return Err(invalid(format!(
            "at most {MAX_RULES} hosts and {MAX_RULES} address ranges can be allowed"
        )));
    }
    let hosts = request
        .allow_hosts
        .iter()
        .map(|text| text.parse().map_err(|e: BadRule| invalid(e.to_string())))
        .collect::<ApiResult<Vec<AllowedHost>>>()?;
    let cidrs = request
        .allow_cidrs
        .iter()
        .map(|text| text.parse().map_err(|e: BadRule| invalid(e.to_string())))
        .collect::<ApiResult<Vec<AllowedCidr>>>()?;
    Ok(Egress::Allowlist(Allowlist { hosts, cidrs }))
}

/// A session's refusals as the API shows them.
pub fn denied(counts: &DenialCounts) -> DeniedCounts {
    DeniedCounts {
        dns: counts.dns,
        ip: counts.ip,
        sni: counts.sni,
        host: counts.host,
        port: counts.port,
        udp: counts.udp,
        rebind: counts.rebind,
    }
}

fn mapping(request: &PortRequest) -> ApiResult<PortMapping> {
    let host_ip = match &request.host_ip {
        Some(text) => text
            .parse::<IpAddr>()
            .map_err(|_| invalid(format!("host_ip {text:?} is not an IP address")))?,
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    if request.guest_port == 0 {
        return Err(invalid("guest_port must be 1 to 65535".into()));
    }
    Ok(PortMapping {
        host_ip,
        host_port: request.host_port,
        guest_port: request.guest_port,
    })
}

/// A published port as the API shows it.
pub fn info(port: &PublishedPort) -> PublishedPortInfo {
    PublishedPortInfo {
        host_ip: port.host.ip().to_string(),
        host_port: port.host.port(),
        guest_port: port.guest_port,
    }
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/ports",
    tag = "ports",
    summary = "List published ports",
    params(SessionPath),
    responses(
        (status = 200, description = "The ports the session publishes now.", body = Vec<PublishedPortInfo>),
        (status = 400, description = "The id is not valid UTF-8.", body = ErrorBody),
        (status = 404, description = "No such session (`not_found`).", body = ErrorBody),
    ),
)]
pub(crate) async fn list_ports(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Vec<PublishedPortInfo>>> {
    let managed = daemon.manager.get(&id)?;
    Ok(Json(managed.session.published().iter().map(info).collect()))
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/ports",
    tag = "ports",
    summary = "Publish a guest port",
    description = "Listens on the host address and port (127.0.0.1 and a free port unless given) \
        before it answers, and forwards each connection to the guest port. The session must have \
        been created with a network.",
    params(SessionPath),
    request_body(content = PortRequest, description = "The port."),
    responses(
        (status = 201, description = "The port, listening.", body = PublishedPortInfo),
        JsonBodyFailures,
        (status = 404, description = "No such session (`not_found`).", body = ErrorBody),
        (status = 409, description = "The host port is in use or may not be listened on \
            (`port_unavailable`).", body = ErrorBody),
        (status = 422, description = "The body is not a valid port, or the session has no \
            network (`invalid`).", body = ErrorBody),
    ),
)]
pub(crate) async fn publish_port(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<PortRequest>,
) -> ApiResult<(StatusCode, Json<PublishedPortInfo>)> {
    let managed = daemon.manager.get(&id)?;
    let mapping = mapping(&request)?;
    let port = blocking(move || managed.session.publish(mapping).map_err(ApiError::from)).await?;
    Ok((StatusCode::CREATED, Json(info(&port))))
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}/ports/{port}",
    tag = "ports",
    summary = "Close a published port",
    description = "Stops listening on the host port (on every address the session publishes it on) \
        and closes the connections it accepted.",
    params(PortPath),
    responses(
        (status = 204, description = "The port is closed."),
        (status = 400, description = "The id is not valid UTF-8, or the port not a number.", body = ErrorBody),
        (status = 404, description = "No such session, or it does not publish that port \
            (`not_found`).", body = ErrorBody),
    ),
)]
pub(crate) async fn unpublish_port(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, port)): ApiPath<(String, u16)>,
) -> ApiResult<StatusCode> {
    let managed = daemon.manager.get(&id)?;
    let closed = blocking(move || {
        let hosts: Vec<SocketAddr> = managed
            .session
            .published()
            .iter()
            .map(|p| p.host)
            .filter(|host| host.port() == port)
            .collect();
        // Every one is closed, even after the first.
        Ok(hosts
            .into_iter()
            .map(|host| managed.session.unpublish(host))
            .filter(|closed| *closed)
            .count()
            > 0)
    })
    .await?;
    if !closed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the session publishes nothing on host port {port}"),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
