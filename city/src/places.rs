//! Where the 41 areas are: the approximate position of each area's government seat (latitude,
//! longitude in degrees), good to a few kilometres. The card-use watcher judges travel between
//! areas by the straight line between seats (less a slack for gates far from their seat), and
//! the load generator uses the same distances to inject travel no rider could make.

/// (area code, latitude, longitude), in code order.
const SEATS: [(u32, f64, f64); 41] = [
    (500101, 30.808, 108.408), // 万州
    (500102, 29.703, 107.390), // 涪陵
    (500103, 29.553, 106.569), // 渝中
    (500104, 29.484, 106.482), // 大渡口
    (500105, 29.607, 106.574), // 江北
    (500106, 29.541, 106.456), // 沙坪坝
    (500107, 29.502, 106.511), // 九龙坡
    (500108, 29.523, 106.645), // 南岸
    (500109, 29.805, 106.397), // 北碚
    (500110, 29.028, 106.651), // 綦江
    (500111, 29.707, 105.722), // 大足
    (500112, 29.718, 106.631), // 渝北
    (500113, 29.402, 106.540), // 巴南
    (500114, 29.533, 108.771), // 黔江
    (500115, 29.858, 107.081), // 长寿
    (500116, 29.290, 106.259), // 江津
    (500117, 29.972, 106.276), // 合川
    (500118, 29.356, 105.927), // 永川
    (500119, 29.157, 107.099), // 南川
    (500120, 29.592, 106.227), // 璧山
    (500151, 29.845, 106.056), // 铜梁
    (500152, 30.191, 105.841), // 潼南
    (500153, 29.405, 105.594), // 荣昌
    (500154, 31.161, 108.393), // 开州
    (500155, 30.654, 107.801), // 梁平
    (500156, 29.326, 107.760), // 武隆
    (500229, 31.948, 108.665), // 城口
    (500230, 29.864, 107.731), // 丰都
    (500231, 30.328, 107.333), // 垫江
    (500233, 30.300, 108.037), // 忠县
    (500235, 30.931, 108.697), // 云阳
    (500236, 31.019, 109.465), // 奉节
    (500237, 31.075, 109.879), // 巫山
    (500238, 31.398, 109.570), // 巫溪
    (500240, 29.999, 108.112), // 石柱
    (500241, 28.448, 108.989), // 秀山
    (500242, 28.842, 108.767), // 酉阳
    (500243, 29.294, 108.166), // 彭水
    (509001, 29.662, 106.558), // 两江新区 (its administration in 渝北)
    (509002, 29.580, 106.330), // 西部科学城重庆高新区
    (509003, 28.960, 106.925), // 万盛经开区
];

fn seat(area: u32) -> Option<(f64, f64)> {
    SEATS
        .binary_search_by_key(&area, |(code, _, _)| *code)
        .ok()
        .map(|i| (SEATS[i].1, SEATS[i].2))
}

/// The great-circle distance (km) between two areas' seats; `None` for an unknown area.
pub fn km_between(a: u32, b: u32) -> Option<f64> {
    const EARTH_KM: f64 = 6371.0;
    let ((lat1, lon1), (lat2, lon2)) = (seat(a)?, seat(b)?);
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    Some(2.0 * EARTH_KM * h.sqrt().asin())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapgate_protocol::registry::AREAS;

    #[test]
    fn every_area_has_a_seat_and_distances_are_plausible() {
        for area in AREAS.iter() {
            assert!(seat(area.code.0).is_some(), "{}", area.code);
        }
        assert!(SEATS.windows(2).all(|w| w[0].0 < w[1].0), "in code order");
        // 万州 to 渝中: about 230 km as the crow flies.
        let far = km_between(500101, 500103).unwrap();
        assert!((200.0..260.0).contains(&far), "{far}");
        // 渝中 to 江北, across the Jialing: a few km.
        assert!(km_between(500103, 500105).unwrap() < 10.0);
        assert_eq!(km_between(500103, 500103), Some(0.0));
        assert_eq!(km_between(500103, 1), None);
    }
}
