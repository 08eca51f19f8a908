//! Spot prices of the running instances (DescribeSpotPriceHistory).

use super::errors::describe;
use super::*;

impl Ec2Provider {
    /// `Provider::prices`: the newest price per (type, zone) of these
    /// instances.
    pub(super) async fn spot_prices(
        &self,
        instance_ids: &[String],
    ) -> Result<HashMap<String, f64>, ProviderError> {
        let wanted: Vec<(String, (String, String))> = {
            let p = self.placement.lock().expect("lock");
            instance_ids.iter().filter_map(|i| Some((i.clone(), p.get(i)?.clone()))).collect()
        };
        let mut types: Vec<String> = wanted.iter().map(|(_, (t, _))| t.clone()).collect();
        types.sort();
        types.dedup();
        if types.is_empty() {
            return Ok(HashMap::new());
        }
        let r = self
            .client
            .describe_spot_price_history()
            .set_instance_types(Some(types.iter().map(|t| InstanceType::from(t.as_str())).collect()))
            .product_descriptions("Linux/UNIX")
            .start_time(aws_sdk_ec2::primitives::DateTime::from(std::time::SystemTime::now()))
            .send()
            .await;
        self.count("DescribeSpotPriceHistory", &r);
        let out = r.map_err(|e| {
            let (code, msg) = describe(&e);
            ProviderError::Other(format!("DescribeSpotPriceHistory: {code}: {msg}"))
        })?;
        // Newest price per (type, zone).
        let mut latest: HashMap<(String, String), (i64, f64)> = HashMap::new();
        for p in out.spot_price_history() {
            let (Some(t), Some(z), Some(price)) = (p.instance_type(), p.availability_zone(), p.spot_price())
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
        Ok(wanted
            .into_iter()
            .filter_map(|(id, (t, z))| {
                let exact = latest.get(&(t.clone(), z)).map(|(_, p)| *p);
                // Zone unknown to the history: the type's cheapest zone.
                let any =
                    || latest.iter().filter(|((lt, _), _)| *lt == t).map(|(_, (_, p))| *p).reduce(f64::min);
                Some((id, exact.or_else(any)?))
            })
            .collect())
    }
}
