//! What the running instances cost per hour: spot ones at the newest spot
//! price of their (type, zone) (DescribeSpotPriceHistory), on-demand ones at
//! the on-demand price of their type in the region (the AWS Price List API,
//! `GetProducts`; cached a week in `<state_dir>/on-demand-prices.json`).

use super::errors::describe;
use super::*;

/// How long an on-demand price is trusted (AWS changes them rarely).
const ON_DEMAND_TTL_SECS: u64 = 7 * 24 * 3600;

/// The hourly on-demand price (USD) in one product of the Price List API
/// (an element of `GetProducts`' `PriceList`, a JSON document):
/// `terms.OnDemand.<offer>.priceDimensions.<dimension>` with unit `Hrs`.
pub fn on_demand_usd(product: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(product).ok()?;
    let offers = v.get("terms")?.get("OnDemand")?.as_object()?;
    offers
        .values()
        .filter_map(|o| o.get("priceDimensions")?.as_object())
        .flat_map(|d| d.values())
        .filter(|d| d.get("unit").and_then(|u| u.as_str()) == Some("Hrs"))
        .filter_map(|d| d.get("pricePerUnit")?.get("USD")?.as_str()?.parse::<f64>().ok())
        .find(|p| *p > 0.0)
}

/// The on-demand price cache: "region/type" -> (USD per hour, fetched at, unix s).
pub(super) type OnDemandCache = HashMap<String, (f64, u64)>;

pub(super) fn read_on_demand_cache(path: &Path) -> OnDemandCache {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Ec2Provider {
    /// `Provider::prices`: spot instances at their spot price, on-demand
    /// ones at the on-demand price.
    pub(super) async fn prices_of(
        &self,
        instance_ids: &[String],
    ) -> Result<HashMap<String, f64>, ProviderError> {
        let (od, spot): (Vec<String>, Vec<String>) = {
            let on_demand = self.on_demand_ids.lock();
            instance_ids.iter().cloned().partition(|i| on_demand.contains(i))
        };
        let mut out = self.spot_prices(&spot).await?;
        // Without the price list, spot prices are still worth having.
        match self.on_demand_prices(&od).await {
            Ok(p) => out.extend(p),
            Err(e) => tracing::warn!("on-demand nodes stay unpriced: {e}"),
        }
        Ok(out)
    }

    /// The on-demand price of each instance's type, from the cache or one
    /// `GetProducts` per type not cached (or older than a week).
    async fn on_demand_prices(&self, instance_ids: &[String]) -> Result<HashMap<String, f64>, ProviderError> {
        let wanted: Vec<(String, String)> = {
            let p = self.placement.lock();
            instance_ids.iter().filter_map(|i| Some((i.clone(), p.get(i)?.itype.clone()))).collect()
        };
        let mut types: Vec<String> = wanted.iter().map(|(_, t)| t.clone()).collect();
        types.sort();
        types.dedup();
        let key = |t: &str| format!("{}/{t}", self.region);
        let now = unix_now();
        let stale: Vec<String> = {
            let cache = self.on_demand_cache.lock();
            types
                .iter()
                .filter(|t| {
                    cache.get(&key(t)).is_none_or(|(_, at)| now.saturating_sub(*at) > ON_DEMAND_TTL_SECS)
                })
                .cloned()
                .collect()
        };
        for t in &stale {
            let price = self.fetch_on_demand(t).await?;
            self.on_demand_cache.lock().insert(key(t), (price, now));
        }
        let cache = self.on_demand_cache.lock();
        if !stale.is_empty()
            && let Err(e) = crate::pki::write_private(
                &self.on_demand_cache_file,
                &serde_json::to_string(&*cache).expect("serializes"),
            )
        {
            tracing::warn!("cannot save {}: {e}", self.on_demand_cache_file.display());
        }
        Ok(wanted.into_iter().filter_map(|(id, t)| Some((id, cache.get(&key(&t))?.0))).collect())
    }

    /// One type's Linux, shared-tenancy on-demand price in this region.
    async fn fetch_on_demand(&self, itype: &str) -> Result<f64, ProviderError> {
        use aws_sdk_pricing::types::{Filter as PriceFilter, FilterType};
        let f = |field: &str, value: &str| {
            PriceFilter::builder()
                .r#type(FilterType::TermMatch)
                .field(field)
                .value(value)
                .build()
                .expect("filter")
        };
        let r = self
            .pricing
            .get_products()
            .service_code("AmazonEC2")
            .filters(f("instanceType", itype))
            .filters(f("regionCode", &self.region))
            .filters(f("operatingSystem", "Linux"))
            .filters(f("tenancy", "Shared"))
            .filters(f("preInstalledSw", "NA"))
            .filters(f("capacitystatus", "Used"))
            .max_results(10)
            .send()
            .await;
        self.count("GetProducts", &r);
        let out = r.map_err(|e| {
            let (code, msg) = describe(&e);
            ProviderError::Other(format!(
                "GetProducts (AWS Price List, on-demand price of {itype}): {code}: {msg} (the identity needs \
                 pricing:GetProducts)"
            ))
        })?;
        out.price_list().iter().find_map(|p| on_demand_usd(p)).ok_or_else(|| {
            ProviderError::Other(format!(
                "the AWS Price List has no Linux on-demand price for {itype} in {}",
                self.region
            ))
        })
    }

    /// The newest spot price per (type, zone) of these instances.
    pub(super) async fn spot_prices(
        &self,
        instance_ids: &[String],
    ) -> Result<HashMap<String, f64>, ProviderError> {
        let wanted: Vec<(String, (String, String))> = {
            let p = self.placement.lock();
            instance_ids
                .iter()
                .filter_map(|i| Some((i.clone(), (p.get(i)?.itype.clone(), p.get(i)?.zone.clone()))))
                .collect()
        };
        let mut types: Vec<String> = wanted.iter().map(|(_, (t, _))| t.clone()).collect();
        types.sort();
        types.dedup();
        if types.is_empty() {
            return Ok(HashMap::new());
        }
        let latest = self.fetch_spot_history(&types).await?;
        Ok(wanted
            .into_iter()
            .filter_map(|(id, (t, z))| {
                let exact = latest.get(&(t.clone(), z)).copied();
                // Zone unknown to the history: the type's cheapest zone.
                let any = || latest.iter().filter(|((lt, _), _)| *lt == t).map(|(_, p)| *p).reduce(f64::min);
                Some((id, exact.or_else(any)?))
            })
            .collect())
    }

    /// The newest Linux spot price of every (type, zone) of `types`: one
    /// `DescribeSpotPriceHistory` (start time now: the price in force in
    /// each zone). Kept in the spot book, which ranks launch candidates.
    pub(super) async fn fetch_spot_history(
        &self,
        types: &[String],
    ) -> Result<HashMap<(String, String), f64>, ProviderError> {
        let mut pages = self
            .client
            .describe_spot_price_history()
            .set_instance_types(Some(types.iter().map(|t| InstanceType::from(t.as_str())).collect()))
            .product_descriptions("Linux/UNIX")
            .start_time(aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()))
            .into_paginator()
            .send();
        // Newest price per (type, zone).
        let mut latest: HashMap<(String, String), (i64, f64)> = HashMap::new();
        while let Some(page) = pages.next().await {
            self.count("DescribeSpotPriceHistory", &page);
            let out = page.map_err(|e| {
                let (code, msg) = describe(&e);
                ProviderError::Other(format!("DescribeSpotPriceHistory: {code}: {msg}"))
            })?;
            for p in out.spot_price_history() {
                let (Some(t), Some(z), Some(price)) =
                    (p.instance_type(), p.availability_zone(), p.spot_price())
                else {
                    continue;
                };
                let Ok(price) = price.parse::<f64>() else { continue };
                let at = p.timestamp().map(|d| d.secs()).unwrap_or(0);
                let e = latest.entry((t.as_str().to_string(), z.to_string())).or_insert((at, price));
                if at >= e.0 {
                    *e = (at, price);
                }
            }
        }
        let latest: HashMap<(String, String), f64> = latest.into_iter().map(|(k, (_, p))| (k, p)).collect();
        let mut book = self.spot_book.lock();
        book.prices.retain(|(t, _), _| !types.contains(t));
        book.prices.extend(latest.iter().map(|(k, p)| (k.clone(), *p)));
        Ok(latest)
    }

    /// Spot prices for ranking launch candidates of `types`, fetched at
    /// each launch (one call per launch, not per node: prices move, and a
    /// launch placed by an hour-old price is not price-optimized); a failed
    /// fetch ranks by the prices seen last (config order where none is
    /// known).
    pub(super) async fn spot_quotes(&self, types: &[String]) -> HashMap<(String, String), f64> {
        if let Err(e) = self.fetch_spot_history(types).await {
            tracing::warn!("launches are ranked by the spot prices seen last: {e}");
        }
        self.spot_book.lock().prices.clone()
    }
}

/// The newest spot prices seen, per (type, zone).
#[derive(Default)]
pub(super) struct SpotBook {
    pub(super) prices: HashMap<(String, String), f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hourly_on_demand_price_is_read_from_a_price_list_product() {
        // The shape of one GetProducts PriceList element (trimmed).
        let product = r#"{"product":{"attributes":{"instanceType":"c5.large","regionCode":"us-east-1"}},
            "terms":{"OnDemand":{"ABC.JRTCKXETXF":{"priceDimensions":{"ABC.JRTCKXETXF.6YS6EN2CT7":{
            "unit":"Hrs","pricePerUnit":{"USD":"0.0850000000"},"description":"$0.085 per On Demand Linux c5.large Instance Hour"}}}},
            "Reserved":{"X":{"priceDimensions":{"Y":{"unit":"Hrs","pricePerUnit":{"USD":"0.05"}}}}}}}"#;
        assert_eq!(on_demand_usd(product), Some(0.085));
        assert_eq!(on_demand_usd(r#"{"terms":{"Reserved":{}}}"#), None);
        assert_eq!(on_demand_usd("not json"), None);
    }
}
