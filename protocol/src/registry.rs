//! Reference data shared by every party: the 41 areas, transit modes, card issuers, operators and
//! concession kinds. Kept as constant tables so the gateway, the load generator and a vendor's
//! test harness agree on every code without loading anything.

use core::fmt;

/// What kind of administrative unit an area is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AreaKind {
    /// 区: a district, division code 5001xx.
    District,
    /// 县 or 自治县: a county, division code 5002xx.
    County,
    /// A functional zone (两江新区, 高新区, 万盛经开区) that has no national division code; its code
    /// is from the project's reserved range 5090xx, which GB/T 2260 does not assign.
    FunctionalZone,
}

/// One of Chongqing's 41 transit areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Area {
    pub code: AreaCode,
    pub name_zh: &'static str,
    pub name_en: &'static str,
    pub kind: AreaKind,
}

/// An area's six-digit code: the GB/T 2260 administrative division code for districts and
/// counties, a project code from 509001..=509003 for the three functional zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AreaCode(pub u32);

impl fmt::Display for AreaCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

impl AreaCode {
    /// The registry entry for this code, if it is one of the 41 areas.
    pub fn area(self) -> Option<&'static Area> {
        AREAS
            .binary_search_by_key(&self, |a| a.code)
            .ok()
            .map(|i| &AREAS[i])
    }
}

const fn area(code: u32, name_zh: &'static str, name_en: &'static str, kind: AreaKind) -> Area {
    Area {
        code: AreaCode(code),
        name_zh,
        name_en,
        kind,
    }
}

use AreaKind::{County, District, FunctionalZone};

/// The 41 areas in ascending code order (the order `AreaCode::area` relies on).
pub const AREAS: [Area; 41] = [
    area(500101, "万州区", "Wanzhou", District),
    area(500102, "涪陵区", "Fuling", District),
    area(500103, "渝中区", "Yuzhong", District),
    area(500104, "大渡口区", "Dadukou", District),
    area(500105, "江北区", "Jiangbei", District),
    area(500106, "沙坪坝区", "Shapingba", District),
    area(500107, "九龙坡区", "Jiulongpo", District),
    area(500108, "南岸区", "Nan'an", District),
    area(500109, "北碚区", "Beibei", District),
    area(500110, "綦江区", "Qijiang", District),
    area(500111, "大足区", "Dazu", District),
    area(500112, "渝北区", "Yubei", District),
    area(500113, "巴南区", "Banan", District),
    area(500114, "黔江区", "Qianjiang", District),
    area(500115, "长寿区", "Changshou", District),
    area(500116, "江津区", "Jiangjin", District),
    area(500117, "合川区", "Hechuan", District),
    area(500118, "永川区", "Yongchuan", District),
    area(500119, "南川区", "Nanchuan", District),
    area(500120, "璧山区", "Bishan", District),
    area(500151, "铜梁区", "Tongliang", District),
    area(500152, "潼南区", "Tongnan", District),
    area(500153, "荣昌区", "Rongchang", District),
    area(500154, "开州区", "Kaizhou", District),
    area(500155, "梁平区", "Liangping", District),
    area(500156, "武隆区", "Wulong", District),
    area(500229, "城口县", "Chengkou", County),
    area(500230, "丰都县", "Fengdu", County),
    area(500231, "垫江县", "Dianjiang", County),
    area(500233, "忠县", "Zhongxian", County),
    area(500235, "云阳县", "Yunyang", County),
    area(500236, "奉节县", "Fengjie", County),
    area(500237, "巫山县", "Wushan", County),
    area(500238, "巫溪县", "Wuxi", County),
    area(500240, "石柱土家族自治县", "Shizhu", County),
    area(500241, "秀山土家族苗族自治县", "Xiushan", County),
    area(500242, "酉阳土家族苗族自治县", "Youyang", County),
    area(500243, "彭水苗族土家族自治县", "Pengshui", County),
    area(509001, "两江新区", "Liangjiang New Area", FunctionalZone),
    area(
        509002,
        "西部科学城重庆高新区",
        "Western Science City Hi-tech Zone",
        FunctionalZone,
    ),
    area(
        509003,
        "万盛经开区",
        "Wansheng Economic Development Zone",
        FunctionalZone,
    ),
];

/// Declares a one-byte wire enumeration: the variants with their codes, `code()`, `from_code()`
/// and a table of every variant, so the codec and the spec cannot drift apart.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $code:literal => $label:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $code ),+
        }

        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The byte this variant has on the wire.
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// The variant for a wire byte, or `None` for a byte no variant has.
            pub const fn from_code(code: u8) -> Option<Self> {
                match code {
                    $( $code => Some($name::$variant), )+
                    _ => None,
                }
            }

            /// A short stable label for logs, reports and configuration files.
            pub const fn label(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }

            /// The variant whose label is `label`.
            pub fn from_label(label: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.label() == label)
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// Transit mode of a gate, and so of the taps it sends.
    Mode {
        Bus = 1 => "bus",
        Metro = 2 => "metro",
        Ferry = 3 => "ferry",
        Cableway = 4 => "cableway",
        /// Sichuan–Chongqing intercity and high-speed rail gates.
        IntercityRail = 5 => "intercity_rail",
    }
}

impl Mode {
    /// Modes whose fare depends on an entry and an exit tap.
    pub const fn needs_exit_tap(self) -> bool {
        matches!(self, Mode::Metro | Mode::IntercityRail)
    }
}

/// Where a card issuer sits, which decides who clears with whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IssuerRegion {
    Chongqing,
    Sichuan,
    /// T-Union (交通联合, JT/T 978) cards from any of its member cities.
    National,
}

wire_enum! {
    /// Who issued the card that was tapped.
    Issuer {
        /// Chongqing third-generation social security card with a transit key.
        ChongqingSsc = 1 => "cq_ssc",
        /// Chongqing city transit card (畅通卡).
        ChongqingCityCard = 2 => "cq_city",
        /// Chengdu / Sichuan Tianfu Tong.
        SichuanTianfuTong = 3 => "sc_tianfutong",
        /// T-Union interoperable card.
        TUnion = 4 => "t_union",
    }
}

impl IssuerRegion {
    pub const fn label(self) -> &'static str {
        match self {
            IssuerRegion::Chongqing => "chongqing",
            IssuerRegion::Sichuan => "sichuan",
            IssuerRegion::National => "t_union",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        [
            IssuerRegion::Chongqing,
            IssuerRegion::Sichuan,
            IssuerRegion::National,
        ]
        .into_iter()
        .find(|r| r.label() == label)
    }
}

impl Issuer {
    pub const fn region(self) -> IssuerRegion {
        match self {
            Issuer::ChongqingSsc | Issuer::ChongqingCityCard => IssuerRegion::Chongqing,
            Issuer::SichuanTianfuTong => IssuerRegion::Sichuan,
            Issuer::TUnion => IssuerRegion::National,
        }
    }
}

wire_enum! {
    /// Concession (公益卡) functions a card can carry.
    Concession {
        None = 0 => "none",
        /// 敬老卡: age 65+, free rides counted against a yearly allowance.
        Elder = 1 => "elder",
        /// 残疾人卡.
        Disabled = 2 => "disabled",
        /// 优抚卡: veterans and military families.
        Veteran = 3 => "veteran",
        Student = 4 => "student",
    }
}

/// A transit operator that receives fare revenue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Operator {
    pub id: u16,
    pub name_zh: &'static str,
    pub name_en: &'static str,
    pub modes: &'static [Mode],
    /// The region whose issuers' clearing pays this operator when other regions' cards ride
    /// it; `None` for the national railway, which belongs to no issuer region and is paid per
    /// ride through the payables from each card issuer.
    pub region: Option<IssuerRegion>,
}

/// Operators used by the simulator and the ledgers. The list is realistic test data, not an
/// official register.
pub const OPERATORS: [Operator; 7] = [
    Operator {
        id: 1,
        name_zh: "重庆公交集团",
        name_en: "Chongqing Public Transport Group",
        modes: &[Mode::Bus],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 2,
        name_zh: "重庆轨道交通集团",
        name_en: "Chongqing Rail Transit",
        modes: &[Mode::Metro],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 3,
        name_zh: "重庆轮渡",
        name_en: "Chongqing Ferry",
        modes: &[Mode::Ferry],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 4,
        name_zh: "重庆长江索道",
        name_en: "Yangtze River Cableway",
        modes: &[Mode::Cableway],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 5,
        name_zh: "缙云山索道",
        name_en: "Jinyun Mountain Cableway",
        modes: &[Mode::Cableway],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 6,
        name_zh: "区县公交",
        name_en: "District and county bus operators",
        modes: &[Mode::Bus],
        region: Some(IssuerRegion::Chongqing),
    },
    Operator {
        id: 7,
        name_zh: "国铁成都局集团（川渝城际）",
        name_en: "China Railway Chengdu Group (Sichuan–Chongqing intercity)",
        modes: &[Mode::IntercityRail],
        region: None,
    },
];

/// The operator with this id.
pub fn operator(id: u16) -> Option<&'static Operator> {
    OPERATORS.iter().find(|o| o.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn forty_one_areas_in_code_order_with_unique_codes() {
        assert_eq!(AREAS.len(), 41);
        assert!(AREAS.windows(2).all(|w| w[0].code < w[1].code));
        let zones = AREAS
            .iter()
            .filter(|a| a.kind == AreaKind::FunctionalZone)
            .count();
        assert_eq!(zones, 3);
        assert_eq!(
            AREAS.iter().filter(|a| a.kind == AreaKind::County).count(),
            12
        );
    }

    #[test]
    fn every_area_code_finds_its_area_and_strangers_find_none() {
        for a in &AREAS {
            assert_eq!(a.code.area(), Some(a));
        }
        assert_eq!(AreaCode(500100).area(), None);
        assert_eq!(AreaCode(510104).area(), None);
    }

    #[test]
    fn wire_enums_round_trip_codes_and_labels() {
        for m in Mode::ALL {
            assert_eq!(Mode::from_code(m.code()), Some(*m));
            assert_eq!(Mode::from_label(m.label()), Some(*m));
        }
        for i in Issuer::ALL {
            assert_eq!(Issuer::from_code(i.code()), Some(*i));
        }
        for c in Concession::ALL {
            assert_eq!(Concession::from_label(c.label()), Some(*c));
        }
        for i in Issuer::ALL {
            let region = i.region();
            assert_eq!(IssuerRegion::from_label(region.label()), Some(region));
        }
        assert_eq!(IssuerRegion::from_label("beijing"), None);
        assert_eq!(Mode::from_code(0), None);
        assert_eq!(Issuer::from_code(9), None);
    }

    #[test]
    fn operator_ids_are_unique_and_cover_every_mode() {
        let ids: HashSet<u16> = OPERATORS.iter().map(|o| o.id).collect();
        assert_eq!(ids.len(), OPERATORS.len());
        for m in Mode::ALL {
            assert!(OPERATORS.iter().any(|o| o.modes.contains(m)), "{m}");
        }
        assert_eq!(operator(7).map(|o| o.region), Some(None));
    }
}
